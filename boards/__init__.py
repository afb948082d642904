"""Board profiles shipped with the agent (TOML files beside this one)."""
