"""Built-in plugins: ordinary modules of `@hookimpl` functions, registered before entry points."""
