"""User entry points: the offline ``LLM`` and the ``loraplex`` command."""
