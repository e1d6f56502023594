/**
 * The syscall filter on every process of a VM (DESIGN §4, layer 3), as a
 * classic BPF program for bubblewrap's `--seccomp`. Modelled on Docker's
 * default profile, as a deny list: calls an ordinary program never needs and
 * that widen the kernel's attack surface fail with EPERM; a few newer calls
 * fail with ENOSYS so libraries fall back to the older ones; and the calls
 * that would make a file setuid or setgid (the VM's root may be the host's
 * root) fail with EPERM. Anything else is allowed: a VM is a Linux userland.
 *
 * x86_64 only (the architecture is checked; any other, and the x32 ABI, is
 * refused). `seccomp.test.ts` runs the program in a small BPF interpreter
 * against the cases that matter, so the bytes below are checked, not trusted.
 */

const AUDIT_ARCH_X86_64 = 0xc000003e;
const X32_SYSCALL_BIT = 0x40000000;

const RET_ALLOW = 0x7fff0000;
const RET_KILL_PROCESS = 0x80000000;
const retErrno = (errno: number) => 0x00050000 | errno;
const EPERM = 1;
const ENOSYS = 38;

// struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low 32 bits first on little-endian).
const NR = 0;
const ARCH = 4;
const arg = (index: number) => 16 + 8 * index;

/** x86_64 numbers, from the kernel's arch/x86/entry/syscalls/syscall_64.tbl. */
export const SYSCALLS = {
  open: 2,
  clone: 56,
  creat: 85,
  chmod: 90,
  fchmod: 91,
  ptrace: 101,
  mknod: 133,
  uselib: 134,
  ustat: 136,
  sysfs: 139,
  vhangup: 153,
  pivot_root: 155,
  _sysctl: 156,
  acct: 163,
  settimeofday: 164,
  mount: 165,
  umount2: 166,
  swapon: 167,
  swapoff: 168,
  reboot: 169,
  iopl: 172,
  ioperm: 173,
  init_module: 175,
  delete_module: 176,
  quotactl: 179,
  lookup_dcookie: 212,
  clock_settime: 227,
  mbind: 237,
  set_mempolicy: 238,
  kexec_load: 246,
  add_key: 248,
  request_key: 249,
  keyctl: 250,
  openat: 257,
  mknodat: 259,
  fchmodat: 268,
  unshare: 272,
  move_pages: 279,
  perf_event_open: 298,
  name_to_handle_at: 303,
  open_by_handle_at: 304,
  clock_adjtime: 305,
  setns: 308,
  process_vm_readv: 310,
  process_vm_writev: 311,
  kcmp: 312,
  finit_module: 313,
  kexec_file_load: 320,
  bpf: 321,
  userfaultfd: 323,
  io_uring_setup: 425,
  io_uring_enter: 426,
  io_uring_register: 427,
  open_tree: 428,
  move_mount: 429,
  fsopen: 430,
  fsconfig: 431,
  fsmount: 432,
  fspick: 433,
  clone3: 435,
  openat2: 437,
  pidfd_getfd: 438,
  mount_setattr: 442,
  quotactl_fd: 443,
  fchmodat2: 452,
} as const;

type Syscall = keyof typeof SYSCALLS;

/**
 * EPERM: kernel modules and kexec, keys, BPF, perf, userfaultfd, mounts and
 * new namespaces (after set-up; bubblewrap made the VM's), ptrace and reading
 * other processes' memory (so no program can take init over), clocks, swap,
 * reboot, raw I/O ports, NUMA policy, and file handles that bypass paths.
 */
export const DENIED: readonly Syscall[] = [
  "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
  "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
  "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
  "mount", "umount2", "pivot_root", "unshare", "setns", "open_tree", "move_mount",
  "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
  "settimeofday", "clock_settime", "clock_adjtime", "swapon", "swapoff", "reboot",
  "iopl", "ioperm", "acct", "quotactl", "quotactl_fd", "lookup_dcookie",
  "name_to_handle_at", "open_by_handle_at", "mbind", "set_mempolicy", "move_pages",
  "uselib", "ustat", "sysfs", "_sysctl", "vhangup",
];

/** ENOSYS, so callers fall back: io_uring (libuv uses its thread pool), clone3 (libc uses clone, checked below), openat2 (its mode is out of reach). */
export const UNAVAILABLE: readonly Syscall[] = ["io_uring_setup", "io_uring_enter", "io_uring_register", "clone3", "openat2"];

const SET_ID_BITS = 0o6000;
const O_CREAT = 0o100;
const O_TMPFILE = 0o20200000;
/** CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET and NEWTIME. */
const NEW_NAMESPACES = 0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80;

/** Calls whose mode argument is refused when it has the setuid or setgid bit. */
const MODE_ARGUMENT: readonly [Syscall, number][] = [
  ["chmod", 1],
  ["fchmod", 1],
  ["fchmodat", 2],
  ["fchmodat2", 2],
  ["creat", 1],
  ["mknod", 1],
  ["mknodat", 2],
];
/** Calls that take a mode only when they create: [call, flags argument, mode argument]. */
const CREATE_MODE_ARGUMENT: readonly [Syscall, number, number][] = [
  ["open", 1, 2],
  ["openat", 2, 3],
];

// Classic BPF opcodes (linux/bpf_common.h).
const LD_W_ABS = 0x20;
const JEQ_K = 0x15;
const JGE_K = 0x35;
const JSET_K = 0x45;
const RET_K = 0x06;

interface Instruction {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

const load = (offset: number): Instruction => ({ code: LD_W_ABS, jt: 0, jf: 0, k: offset });
const ret = (value: number): Instruction => ({ code: RET_K, jt: 0, jf: 0, k: value });
const jump = (code: number, k: number, jt: number, jf: number): Instruction => ({ code, jt, jf, k });

/** The filter as instructions; each rule is a self-contained block that the next one follows. */
export function filterInstructions(): Instruction[] {
  const program: Instruction[] = [
    load(ARCH),
    jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
    ret(RET_KILL_PROCESS),
    load(NR),
    jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
    ret(retErrno(EPERM)),
  ];
  for (const name of DENIED) program.push(jump(JEQ_K, SYSCALLS[name], 0, 1), ret(retErrno(EPERM)));
  for (const name of UNAVAILABLE) program.push(jump(JEQ_K, SYSCALLS[name], 0, 1), ret(retErrno(ENOSYS)));
  // Each block below returns, so the syscall number in A (loaded above) is only compared, never lost.
  for (const [name, mode] of MODE_ARGUMENT) {
    program.push(jump(JEQ_K, SYSCALLS[name], 0, 4), load(arg(mode)), jump(JSET_K, SET_ID_BITS, 0, 1), ret(retErrno(EPERM)), ret(RET_ALLOW));
  }
  for (const [name, flags, mode] of CREATE_MODE_ARGUMENT) {
    program.push(
      jump(JEQ_K, SYSCALLS[name], 0, 6),
      load(arg(flags)),
      jump(JSET_K, O_CREAT | O_TMPFILE, 0, 3),
      load(arg(mode)),
      jump(JSET_K, SET_ID_BITS, 0, 1),
      ret(retErrno(EPERM)),
      ret(RET_ALLOW),
    );
  }
  program.push(jump(JEQ_K, SYSCALLS.clone, 0, 4), load(arg(0)), jump(JSET_K, NEW_NAMESPACES, 0, 1), ret(retErrno(EPERM)), ret(RET_ALLOW));
  program.push(ret(RET_ALLOW));
  return program;
}

/** The program as bubblewrap reads it: struct sock_filter[], 8 bytes each, little-endian. */
export function seccompProgram(): Buffer {
  const program = filterInstructions();
  const bytes = Buffer.alloc(program.length * 8);
  program.forEach((instruction, i) => {
    bytes.writeUInt16LE(instruction.code, i * 8);
    bytes.writeUInt8(instruction.jt, i * 8 + 2);
    bytes.writeUInt8(instruction.jf, i * 8 + 3);
    bytes.writeUInt32LE(instruction.k >>> 0, i * 8 + 4);
  });
  return bytes;
}

/** Whether this host's architecture is one the filter is written for. */
export function seccompSupported(): boolean {
  return process.arch === "x64";
}
