"""The reliability harness: bad-request fuzzer, client fault injector and soak (`make reliability` runs the long version)."""
