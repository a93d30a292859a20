"""The `gist` command line: thin verbs over the library."""
