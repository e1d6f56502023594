/**
 * Descriptors init inherited without asking for them. The server's process
 * may hold descriptors its own parent left open without close-on-exec (a
 * service manager's socket, a log pipe, a shell's); Node cannot mark them, and
 * neither the spawn nor bubblewrap closes them, so they would reach init and
 * from there every program of the VM — a guest could then write to whatever
 * the host left open. init closes them before it starts anything.
 *
 * What init needs is either its stdio and the IPC channel (0–3), or opened by
 * Node itself, which always sets close-on-exec: so any other descriptor
 * without O_CLOEXEC is inherited, and is closed.
 */
import { closeSync, readdirSync, readFileSync } from "node:fs";

const O_CLOEXEC = 0o2000000;
const KEPT = 3;

export function closeInheritedDescriptors(): number[] {
  const closed: number[] = [];
  for (const name of readdirSync("/proc/self/fd")) {
    const fd = Number(name);
    if (!Number.isInteger(fd) || fd <= KEPT) continue;
    let flags: number;
    try {
      const info = readFileSync(`/proc/self/fdinfo/${fd}`, "utf8");
      flags = Number.parseInt(/^flags:\s*([0-7]+)/m.exec(info)?.[1] ?? "", 8);
    } catch {
      continue; // the directory listing's own descriptor, gone already
    }
    if (Number.isNaN(flags) || (flags & O_CLOEXEC) !== 0) continue;
    try {
      closeSync(fd);
      closed.push(fd);
    } catch {
      // closed between the listing and now
    }
  }
  return closed;
}
