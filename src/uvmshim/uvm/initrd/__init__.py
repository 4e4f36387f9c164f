"""Guest boot-file helpers: the /init script (``init.sh``, package data), cpio and ELF readers."""
