"""Start User-Mode Linux on a host whose CPU state is larger than UML 6.1 and 6.12 can hand over.

Debian 12's UML (6.1) saves and restores a guest process's FPU state with
PTRACE_GETREGSET/SETREGSET(NT_X86_XSTATE) and a fixed buffer of sizeof(struct _xstate) (832
bytes: arch/x86/um/os-Linux/registers.c, arch_init_registers/put_fp_registers). A host CPU with
AVX-512 or AMX has a larger XSAVE area, and the host kernel refuses a SETREGSET of another size
(EFAULT: arch/x86/kernel/fpu/regset.c, xstateregs_set; both read from memory of the sources, not
checked line by line here). Seen on this project's Sapphire Rapids machines: every UML boot died at
its first process with "userspace - ptrace set fp regs failed, errno = 14". Debian 13's UML (6.12,
the one the lab boots: lab/uml.py) dies the same way without this guard and boots with it; sid's 7.2
boots without it (tried by hand, November 2026, with its seccomp=on and =off; why was not read in
its source).

This launcher installs a seccomp filter that makes exactly that regset fail with EIO, then execs
UML: its probe (arch_init_registers) then finds no XSTATE support and UML falls back to
PTRACE_GETFPREGS/SETFPREGS (the 512-byte FXSAVE area). Vector state beyond it (YMM/ZMM upper
halves) is then not carried by UML: the guest's programs must not rely on it, so the lab sets
GLIBC_TUNABLES (GUEST_GLIBC_TUNABLES below) so glibc's string functions use their SSE2 versions.
Measured without that: `ip link` printed "state %s" and Python died in getpath. A corrupted
computation makes a lab check fail; it cannot make one pass. A program started with an environment
of its own loses the tunables: pluto runs `addconn` with an empty one (Libreswan v5.2
programs/pluto/server.c:1064), and 5.2's addconn then read `esp=` as `encapsulation=`; the lab's
router setup wraps addconn to put them back (lab/router-setup.sh, lab/plutoconf.py).

    python3 uml_xstate.py /usr/bin/linux ARGS...
"""
import ctypes
import os
import struct
import sys

# Go programs (dockerd, containerd, runc in the Docker lab) pick AVX/AVX2/AVX-512 code paths
# themselves from CPUID, not through glibc: GODEBUG=cpu.all=off turns off every optional x86
# feature Go's internal/cpu knows (processOptions in src/internal/cpu/cpu.go: "If env contains
# cpu.all=off then all cpu features referenced through the options variable are disabled";
# SSE2, required on amd64, is not among them). Read from Go's sources via the search index, not
# checked against the exact Go release Debian's docker.io was built with.
GUEST_GODEBUG = "cpu.all=off"

GUEST_GLIBC_TUNABLES = ("glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512BW,-AVX512VL,-AVX512DQ,-AVX512CD,"
                        "-ERMS,-FMA,-RTM,-FSRM,-BMI1,-BMI2,-SSE4_2,-SSE4_1")

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64, NR_PTRACE = 0xC000003E, 101
GETREGSET, SETREGSET, NT_X86_XSTATE, EIO = 0x4204, 0x4205, 0x202, 5
ALLOW, REFUSE = 0x7FFF0000, 0x00050000 | EIO
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# seccomp_data: nr at 0, arch at 4, args[0] at 16, args[2] at 32 (low halves, little-endian)
FILTER = b"".join([
    _ins(LD_W_ABS, 0, 0, 4), _ins(JEQ_K, 0, 7, AUDIT_ARCH_X86_64),
    _ins(LD_W_ABS, 0, 0, 0), _ins(JEQ_K, 0, 5, NR_PTRACE),
    _ins(LD_W_ABS, 0, 0, 16), _ins(JEQ_K, 1, 0, GETREGSET), _ins(JEQ_K, 0, 2, SETREGSET),
    _ins(LD_W_ABS, 0, 0, 32), _ins(JEQ_K, 1, 0, NT_X86_XSTATE),
    _ins(RET_K, 0, 0, ALLOW), _ins(RET_K, 0, 0, REFUSE)])


def main(argv: list[str]) -> None:
    prog = ctypes.create_string_buffer(FILTER)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(FILTER) // 8, ctypes.addressof(prog)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0):
        sys.exit(f"uml_xstate: cannot install the seccomp filter: {os.strerror(ctypes.get_errno())}")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
