"""Where things run: Ray connection, runtime_env, storage, configuration."""
