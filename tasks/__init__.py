"""One module per task type: its handler. ``schema`` holds the message structs of all of them."""
