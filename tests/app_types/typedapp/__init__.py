"""A host application's own package, as tests use it: value types, a model kept by reference, and
the function that registers them (``typedapp.isolation:register_types``)."""
