"""The HTTP surface: thin handlers that parse, delegate and shape responses."""
