// The VM's syscall filter is bytes handed to the kernel: decode them and run
// them, in a classic-BPF interpreter of the few instructions the filter uses,
// against the calls that matter.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { test } from "node:test";
import { DENIED, SYSCALLS, UNAVAILABLE, seccompProgram } from "./seccomp.ts";

const ALLOW = 0x7fff0000;
const KILL = 0x80000000;
const EPERM = 0x00050000 | 1;
const ENOSYS = 0x00050000 | 38;
const X86_64 = 0xc000003e;

/** Runs the filter on one syscall, as the kernel would: returns its verdict. */
function run(nr: number, args: number[] = [], arch = X86_64): number {
  const program = seccompProgram();
  const data = Buffer.alloc(64);
  data.writeUInt32LE(nr >>> 0, 0);
  data.writeUInt32LE(arch >>> 0, 4);
  args.forEach((value, i) => data.writeUInt32LE(value >>> 0, 16 + 8 * i));
  let a = 0;
  for (let pc = 0; pc < program.length / 8; ) {
    const code = program.readUInt16LE(pc * 8);
    const jt = program.readUInt8(pc * 8 + 2);
    const jf = program.readUInt8(pc * 8 + 3);
    const k = program.readUInt32LE(pc * 8 + 4);
    switch (code) {
      case 0x20: // ld [k]
        a = data.readUInt32LE(k);
        pc++;
        break;
      case 0x15: // jeq #k
        pc += 1 + (a === k ? jt : jf);
        break;
      case 0x35: // jge #k
        pc += 1 + (a >= k ? jt : jf);
        break;
      case 0x45: // jset #k
        pc += 1 + ((a & k) !== 0 ? jt : jf);
        break;
      case 0x06: // ret #k
        return k;
      default:
        assert.fail(`unexpected opcode 0x${code.toString(16)} at ${pc}`);
    }
  }
  return assert.fail("the program ran off its end");
}

test("every jump lands inside the program and it ends with a return", () => {
  const program = seccompProgram();
  const count = program.length / 8;
  assert.ok(count < 4096, "BPF_MAXINSNS");
  for (let pc = 0; pc < count; pc++) {
    const code = program.readUInt16LE(pc * 8);
    if ((code & 0x07) === 0x05) {
      assert.ok(pc + 1 + program.readUInt8(pc * 8 + 2) < count && pc + 1 + program.readUInt8(pc * 8 + 3) < count, `jump at ${pc}`);
    }
  }
  assert.equal(program.readUInt16LE((count - 1) * 8), 0x06);
});

test("ordinary calls are allowed; another architecture is killed; the x32 ABI is refused", () => {
  for (const nr of [0, 1, 3, 39, 57, 59, 231, 41, 42, 49, 50, 43, 288]) assert.equal(run(nr), ALLOW, `syscall ${nr}`);
  assert.equal(run(0, [], 0x40000003), KILL);
  assert.equal(run(0x40000000 | 39), EPERM);
});

test("kernel attack surface is EPERM, and io_uring, clone3 and openat2 are ENOSYS", () => {
  for (const name of DENIED) assert.equal(run(SYSCALLS[name]), EPERM, name);
  for (const name of UNAVAILABLE) assert.equal(run(SYSCALLS[name]), ENOSYS, name);
  for (const name of ["ptrace", "keyctl", "bpf", "userfaultfd", "perf_event_open", "mount", "unshare", "setns", "init_module", "kexec_load"] as const) {
    assert.ok(DENIED.includes(name), name);
  }
});

test("setuid and setgid modes are refused; ordinary modes are not", () => {
  const S_ISUID = 0o4000;
  const S_ISGID = 0o2000;
  assert.equal(run(SYSCALLS.chmod, [0, 0o755]), ALLOW);
  assert.equal(run(SYSCALLS.chmod, [0, 0o755 | S_ISUID]), EPERM);
  assert.equal(run(SYSCALLS.fchmod, [3, 0o755 | S_ISGID]), EPERM);
  assert.equal(run(SYSCALLS.fchmodat, [-100, 0, 0o4755]), EPERM);
  assert.equal(run(SYSCALLS.fchmodat, [-100, 0, 0o644]), ALLOW);
  assert.equal(run(SYSCALLS.creat, [0, 0o4755]), EPERM);
  assert.equal(run(SYSCALLS.mknodat, [-100, 0, 0o100000 | 0o4755]), EPERM);
  // open's mode counts only when it creates: a stray mode on a plain open is fine.
  assert.equal(run(SYSCALLS.open, [0, 0, 0o4755]), ALLOW);
  assert.equal(run(SYSCALLS.open, [0, 0o100 | 1, 0o4755]), EPERM);
  assert.equal(run(SYSCALLS.openat, [-100, 0, 0o100 | 1, 0o644]), ALLOW);
  assert.equal(run(SYSCALLS.openat, [-100, 0, 0o100 | 1, 0o2644]), EPERM);
});

test("clone may not make namespaces; plain clone (fork, threads) is allowed", () => {
  const SIGCHLD = 17;
  const THREAD_FLAGS = 0x3d0f00;
  assert.equal(run(SYSCALLS.clone, [SIGCHLD]), ALLOW);
  assert.equal(run(SYSCALLS.clone, [THREAD_FLAGS]), ALLOW);
  for (const flag of [0x10000000, 0x20000, 0x40000000, 0x20000000, 0x80]) assert.equal(run(SYSCALLS.clone, [SIGCHLD | flag]), EPERM, `flag 0x${flag.toString(16)}`);
});

const HEADER = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
test("the syscall numbers are the kernel's", { skip: existsSync(HEADER) ? false : `${HEADER} is not installed` }, () => {
  const text = readFileSync(HEADER, "utf8");
  for (const [name, nr] of Object.entries(SYSCALLS)) {
    const found = new RegExp(`^#define __NR_${name} (\\d+)$`, "m").exec(text);
    if (found) assert.equal(Number(found[1]), nr, name);
  }
});
