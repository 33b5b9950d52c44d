"""The libvirt hook script ``qemu``, shipped as package data for ``pagefusion install``."""
