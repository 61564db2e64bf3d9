"""Training: options, the model/objective components, setup before distributed work, the session, engine and loop."""
