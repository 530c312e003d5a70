"""What spans processes and hosts: request-state keys and the event bus."""
