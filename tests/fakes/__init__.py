"""Local fake servers that follow the overflow providers' public contracts (see
``../shared/reference/providers.md``), for tests that must not reach the internet."""
