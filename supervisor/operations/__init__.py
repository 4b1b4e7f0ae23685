"""The operator's verbs on the supervisor's models, and the model table only they change."""
