pytest_plugins = ["xenha.testing.fixtures", "xenha.testing.stack_fixtures"]
