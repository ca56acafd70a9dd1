pytest_plugins = ["xenha.testing.fixtures"]
