"""The model side: variables declared in a model function (`Scope`), their specs and placement,
`init` and its compiled programs, Flax models, and the `State` that holds the values. It never
touches storage."""
