"""Model families (one file each) and the registry that maps a config's architecture to a class."""
