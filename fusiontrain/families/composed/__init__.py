"""A composed model: any decoder family with any encoder family."""
