"""The default seccomp profile of the containers uvmshim generates (``uvmshim run``, pods).

The profile has the semantics of podman's and Docker's default profile, written for the
utility VM's kernel (Debian 12's Linux 6.1, x86_64) and the guest's crun + libseccomp 2.5.4:

* **Deny by default.** ``defaultAction`` is ``SCMP_ACT_ERRNO`` with ``EPERM``; the syscalls
  an ordinary program needs are allowed by name (:data:`ALLOWED`).
* **Left out** (so ``EPERM``): what reaches state the container does not own or widens the
  kernel's attack surface — the kernel keyrings (not namespaced), module loading, kexec,
  ``reboot``, swap, ``acct``, the time of day, ``userfaultfd``, ``io_uring`` (runs syscalls
  past seccomp), ``open_by_handle_at`` (the "shocker" escape), raw port I/O, ``perf_event_open``,
  ``bpf``, the mount API, ``unshare``/``setns``, ``syslog``, ``modify_ldt`` and obsolete or
  unimplemented calls (:data:`DENIED`).
* **By capability.** Some of those are allowed when the container is granted the capability
  the kernel checks for them (:data:`BY_CAPABILITY`), e.g. the mount API, ``unshare`` and
  ``setns`` with ``CAP_SYS_ADMIN``, ``settimeofday`` with ``CAP_SYS_TIME``.
* **By argument.** ``clone`` is allowed only without namespace flags (``CLONE_NEWUSER`` and
  the others; any flags with ``CAP_SYS_ADMIN``); ``clone3``, whose flags seccomp cannot read
  (they are in memory), fails with ``ENOSYS`` so that libc falls back to ``clone``;
  ``personality`` only with the harmless personas; ``socket`` for every address family except
  ``AF_ALG`` (the kernel crypto API) and ``AF_VSOCK`` (the hypervisor's sockets: the UVM's
  host is not the container's business).
* ``ptrace``, ``kcmp`` and ``process_vm_readv``/``writev`` are allowed: since Linux 4.8 a
  traced process cannot use ``ptrace`` to get around its seccomp filter, and the UVM's kernel
  is newer than that.
* **Only x86_64.** The filter names one architecture, so a 32-bit (``int 0x80``) or x32
  syscall is not "not allowed" but foreign to the filter, and libseccomp kills the thread that
  makes it. Docker also lists i386 and x32; we do not, which keeps the ia32 compatibility entry
  points (and ``socketcall``, whose address family seccomp cannot read) closed — at the price
  of 32-bit programs not running, as under gVisor.
* **Syscalls the guest kernel lacks.** The three libseccomp knows but Linux 6.1 does not have
  (:data:`NEWER_THAN_GUEST_KERNEL`) fail with ``ENOSYS``, as on the bare kernel, because glibc
  falls back to older calls only on ``ENOSYS`` (``fchmodat2`` for ``lchmod``).

Every syscall of the table is in exactly one of :data:`ALLOWED`, :data:`ARG_RULED`,
:data:`BY_CAPABILITY` or :data:`DENIED` (the unit tests check it), so a syscall is never
allowed by omission.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: x86_64 system call numbers of Linux 6.1, the UVM's kernel (generated from linux-libc-dev
#: 6.1's ``asm/unistd_64.h``: ``grep '#define __NR_'``). A newer guest kernel needs the new
#: calls classified below and added here.
SYSCALLS_X86_64: Mapping[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
    "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
    "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18,
    "readv": 19, "writev": 20, "access": 21, "pipe": 22, "select": 23, "sched_yield": 24,
    "mremap": 25, "msync": 26, "mincore": 27, "madvise": 28, "shmget": 29, "shmat": 30,
    "shmctl": 31, "dup": 32, "dup2": 33, "pause": 34, "nanosleep": 35, "getitimer": 36,
    "alarm": 37, "setitimer": 38, "getpid": 39, "sendfile": 40, "socket": 41, "connect": 42,
    "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48,
    "bind": 49, "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53,
    "setsockopt": 54, "getsockopt": 55, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
    "exit": 60, "wait4": 61, "kill": 62, "uname": 63, "semget": 64, "semop": 65, "semctl": 66,
    "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "fcntl": 72, "flock": 73,
    "fsync": 74, "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getdents": 78, "getcwd": 79,
    "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86,
    "unlink": 87, "symlink": 88, "readlink": 89, "chmod": 90, "fchmod": 91, "chown": 92,
    "fchown": 93, "lchown": 94, "umask": 95, "gettimeofday": 96, "getrlimit": 97, "getrusage": 98,
    "sysinfo": 99, "times": 100, "ptrace": 101, "getuid": 102, "syslog": 103, "getgid": 104,
    "setuid": 105, "setgid": 106, "geteuid": 107, "getegid": 108, "setpgid": 109, "getppid": 110,
    "getpgrp": 111, "setsid": 112, "setreuid": 113, "setregid": 114, "getgroups": 115,
    "setgroups": 116, "setresuid": 117, "getresuid": 118, "setresgid": 119, "getresgid": 120,
    "getpgid": 121, "setfsuid": 122, "setfsgid": 123, "getsid": 124, "capget": 125, "capset": 126,
    "rt_sigpending": 127, "rt_sigtimedwait": 128, "rt_sigqueueinfo": 129, "rt_sigsuspend": 130,
    "sigaltstack": 131, "utime": 132, "mknod": 133, "uselib": 134, "personality": 135,
    "ustat": 136, "statfs": 137, "fstatfs": 138, "sysfs": 139, "getpriority": 140,
    "setpriority": 141, "sched_setparam": 142, "sched_getparam": 143, "sched_setscheduler": 144,
    "sched_getscheduler": 145, "sched_get_priority_max": 146, "sched_get_priority_min": 147,
    "sched_rr_get_interval": 148, "mlock": 149, "munlock": 150, "mlockall": 151,
    "munlockall": 152, "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156,
    "prctl": 157, "arch_prctl": 158, "adjtimex": 159, "setrlimit": 160, "chroot": 161,
    "sync": 162, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176,
    "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180,
    "getpmsg": 181, "putpmsg": 182, "afs_syscall": 183, "tuxcall": 184, "security": 185,
    "gettid": 186, "readahead": 187, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193, "listxattr": 194, "llistxattr": 195,
    "flistxattr": 196, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "tkill": 200,
    "time": 201, "futex": 202, "sched_setaffinity": 203, "sched_getaffinity": 204,
    "set_thread_area": 205, "io_setup": 206, "io_destroy": 207, "io_getevents": 208,
    "io_submit": 209, "io_cancel": 210, "get_thread_area": 211, "lookup_dcookie": 212,
    "epoll_create": 213, "epoll_ctl_old": 214, "epoll_wait_old": 215, "remap_file_pages": 216,
    "getdents64": 217, "set_tid_address": 218, "restart_syscall": 219, "semtimedop": 220,
    "fadvise64": 221, "timer_create": 222, "timer_settime": 223, "timer_gettime": 224,
    "timer_getoverrun": 225, "timer_delete": 226, "clock_settime": 227, "clock_gettime": 228,
    "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232,
    "epoll_ctl": 233, "tgkill": 234, "utimes": 235, "vserver": 236, "mbind": 237,
    "set_mempolicy": 238, "get_mempolicy": 239, "mq_open": 240, "mq_unlink": 241,
    "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
    "kexec_load": 246, "waitid": 247, "add_key": 248, "request_key": 249, "keyctl": 250,
    "ioprio_set": 251, "ioprio_get": 252, "inotify_init": 253, "inotify_add_watch": 254,
    "inotify_rm_watch": 255, "migrate_pages": 256, "openat": 257, "mkdirat": 258, "mknodat": 259,
    "fchownat": 260, "futimesat": 261, "newfstatat": 262, "unlinkat": 263, "renameat": 264,
    "linkat": 265, "symlinkat": 266, "readlinkat": 267, "fchmodat": 268, "faccessat": 269,
    "pselect6": 270, "ppoll": 271, "unshare": 272, "set_robust_list": 273, "get_robust_list": 274,
    "splice": 275, "tee": 276, "sync_file_range": 277, "vmsplice": 278, "move_pages": 279,
    "utimensat": 280, "epoll_pwait": 281, "signalfd": 282, "timerfd_create": 283, "eventfd": 284,
    "fallocate": 285, "timerfd_settime": 286, "timerfd_gettime": 287, "accept4": 288,
    "signalfd4": 289, "eventfd2": 290, "epoll_create1": 291, "dup3": 292, "pipe2": 293,
    "inotify_init1": 294, "preadv": 295, "pwritev": 296, "rt_tgsigqueueinfo": 297,
    "perf_event_open": 298, "recvmmsg": 299, "fanotify_init": 300, "fanotify_mark": 301,
    "prlimit64": 302, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305,
    "syncfs": 306, "sendmmsg": 307, "setns": 308, "getcpu": 309, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "sched_setattr": 314,
    "sched_getattr": 315, "renameat2": 316, "seccomp": 317, "getrandom": 318, "memfd_create": 319,
    "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323, "membarrier": 324,
    "mlock2": 325, "copy_file_range": 326, "preadv2": 327, "pwritev2": 328, "pkey_mprotect": 329,
    "pkey_alloc": 330, "pkey_free": 331, "statx": 332, "io_pgetevents": 333, "rseq": 334,
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "close_range": 436,
    "openat2": 437, "pidfd_getfd": 438, "faccessat2": 439, "process_madvise": 440,
    "epoll_pwait2": 441, "mount_setattr": 442, "quotactl_fd": 443, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "memfd_secret": 447,
    "process_mrelease": 448, "futex_waitv": 449, "set_mempolicy_home_node": 450,
}

#: Calls libseccomp 2.5.4 (Debian 12's, in the guest) can name but Linux 6.1 lacks.
NEWER_THAN_GUEST_KERNEL: Mapping[str, int] = {
    "cachestat": 451, "fchmodat2": 452, "map_shadow_stack": 453,
}

EPERM = 1
ENOSYS = 38

AF_ALG = 38
AF_VSOCK = 40

#: ``clone`` flags that create namespaces (``CLONE_NEWTIME`` is not one of clone's: its bit
#: is the exit signal there).
CLONE_NAMESPACE_FLAGS = (0x00020000  # CLONE_NEWNS
                         | 0x02000000  # CLONE_NEWCGROUP
                         | 0x04000000  # CLONE_NEWUTS
                         | 0x08000000  # CLONE_NEWIPC
                         | 0x10000000  # CLONE_NEWUSER
                         | 0x20000000  # CLONE_NEWPID
                         | 0x40000000)  # CLONE_NEWNET

#: ``personality(2)`` values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
#: and 0xffffffff (which only reads the persona).
PERSONAS = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Allowed whatever the capabilities.
ALLOWED: frozenset[str] = _names("""
    accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
    clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat
    dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait
    eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate
    fanotify_mark fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr flistxattr
    flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat
    get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid geteuid getgid
    getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom
    getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday
    getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
    io_destroy io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set kcmp
    kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link
    linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier
    memfd_create mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect
    mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget
    msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat open
    openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free
    pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease
    process_vm_readv process_vm_writev pselect6 ptrace pwrite64 pwritev pwritev2 read readahead
    readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename
    renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
    rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
    sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr
    sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity sched_setattr
    sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
    sendfile sendmmsg sendmsg sendto set_robust_list set_thread_area set_tid_address setfsgid
    setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
    setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown
    sigaltstack signalfd signalfd4 socketpair splice stat statfs statx symlink symlinkat sync
    sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
    timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill
    truncate umask uname unlink unlinkat utime utimensat utimes vfork vmsplice wait4 waitid
    write writev
""")

#: Allowed only through the argument rules of :func:`default_profile`.
ARG_RULED: frozenset[str] = _names("clone clone3 personality socket")

#: Allowed when the container's bounding set holds the capability (the one the kernel asks
#: for when the call does something beyond what the namespaces already confine).
BY_CAPABILITY: Mapping[str, frozenset[str]] = {
    "CAP_SYS_ADMIN": _names("""
        bpf fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount mount_setattr
        move_mount open_tree perf_event_open pivot_root quotactl quotactl_fd setdomainname
        sethostname setns syslog umount2 unshare
    """),
    "CAP_BPF": _names("bpf"),
    "CAP_PERFMON": _names("perf_event_open"),
    "CAP_SYSLOG": _names("syslog"),
    "CAP_SYS_BOOT": _names("reboot"),
    "CAP_SYS_CHROOT": _names("chroot"),
    "CAP_SYS_MODULE": _names("delete_module finit_module init_module"),
    "CAP_SYS_PACCT": _names("acct"),
    "CAP_SYS_PTRACE": _names("pidfd_getfd process_madvise"),
    "CAP_SYS_RAWIO": _names("ioperm iopl"),
    "CAP_SYS_TIME": _names("adjtimex clock_adjtime clock_settime settimeofday"),
    "CAP_SYS_TTY_CONFIG": _names("vhangup"),
    "CAP_SYS_NICE": _names("get_mempolicy mbind migrate_pages move_pages set_mempolicy "
                           "set_mempolicy_home_node"),
    "CAP_DAC_READ_SEARCH": _names("open_by_handle_at"),
}

#: Never allowed, with why.
DENIED: Mapping[str, str] = {
    **dict.fromkeys(("add_key", "keyctl", "request_key"),
                    "the kernel keyrings are not namespaced"),
    **dict.fromkeys(("kexec_load", "kexec_file_load"), "replaces the UVM's kernel"),
    **dict.fromkeys(("swapon", "swapoff"), "the UVM's swap"),
    "userfaultfd": "stalls kernel page faults at will (a race-window widener for exploits)",
    **dict.fromkeys(("io_uring_setup", "io_uring_enter", "io_uring_register"),
                    "performs I/O syscalls past the seccomp filter"),
    "memfd_secret": "memory hidden from the kernel's own direct map; no container needs it",
    "modify_ldt": "16-bit segments (Wine, DOSEMU); a history of kernel bugs",
    **dict.fromkeys(("uselib", "ustat", "sysfs", "_sysctl"), "obsolete"),
    **dict.fromkeys(("create_module", "get_kernel_syms", "query_module", "nfsservctl"),
                    "removed from Linux"),
    **dict.fromkeys(("afs_syscall", "tuxcall", "security", "vserver", "getpmsg", "putpmsg",
                     "epoll_ctl_old", "epoll_wait_old"), "never implemented on x86_64"),
}


def _rule(names: Iterable[str], action: str, *, errno: int | None = None,
          args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"names": sorted(names), "action": action}
    if errno is not None:
        rule["errnoRet"] = errno
    if args:
        rule["args"] = args
    return rule


def _arg(op: str, value: int, value_two: int = 0, index: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def default_profile(capabilities: Iterable[str] = ()) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for a container whose bounding set is ``capabilities``.

    Syscall names appear in a deterministic (sorted) order, so equal inputs give equal JSON.
    """
    caps = set(capabilities)
    allowed = set(ALLOWED)
    for cap, names in BY_CAPABILITY.items():
        if cap in caps:
            allowed |= names
    rules = [_rule(allowed, "SCMP_ACT_ALLOW")]
    if "CAP_SYS_ADMIN" in caps:
        rules.append(_rule(["clone", "clone3"], "SCMP_ACT_ALLOW"))
    else:
        rules.append(_rule(["clone"], "SCMP_ACT_ALLOW", args=[
            _arg("SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)]))
        rules.append(_rule(["clone3"], "SCMP_ACT_ERRNO", errno=ENOSYS))
    # One rule per value: rules for one syscall are OR-ed, a rule's conditions AND-ed.
    rules += [_rule(["personality"], "SCMP_ACT_ALLOW", args=[_arg("SCMP_CMP_EQ", p)])
              for p in PERSONAS]
    rules += [
        _rule(["socket"], "SCMP_ACT_ALLOW", args=[_arg("SCMP_CMP_LT", AF_ALG)]),
        _rule(["socket"], "SCMP_ACT_ALLOW", args=[_arg("SCMP_CMP_EQ", AF_ALG + 1)]),
        _rule(["socket"], "SCMP_ACT_ALLOW", args=[_arg("SCMP_CMP_GT", AF_VSOCK)]),
    ]
    rules.append(_rule(NEWER_THAN_GUEST_KERNEL, "SCMP_ACT_ERRNO", errno=ENOSYS))
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules,
    }
