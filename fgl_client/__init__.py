"""The silo's side of the app: its ClientApp, what each message does, and the silo's data."""
