"""pagefusion: VirtualBox-style Page Fusion for libvirt/QEMU hosts."""

__version__ = "0.1.0"
