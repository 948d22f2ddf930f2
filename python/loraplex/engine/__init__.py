"""The engine: arguments, request state, the step loop."""
