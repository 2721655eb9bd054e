"""Site readers, one per native dataset layout. ``get_reader(site, root)`` picks one."""
