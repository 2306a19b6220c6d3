"""A network-namespace lab (NATs, an "internet", relays inside it) for end-to-end tests."""
