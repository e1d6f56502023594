/**
 * Installed in every guest before user code runs: connects to the VM kernel on
 * fd 3 and routes the socket layer (net, dns, dgram) and child processes to it.
 * Node's permission model refuses the real thing, so this channel is the only
 * way out of the process.
 */
import { syncBuiltinESMExports } from "node:module";
import { installChildProcessPatch } from "./child-process-patch.ts";
import { installDgramPatch } from "./dgram-patch.ts";
import { installDnsPatch } from "./dns-patch.ts";
import { KernelClient } from "./kernel-client.ts";
import { installNetPatch } from "./net-patch.ts";
import { installTlsPatch } from "./tls-patch.ts";

export const KERNEL_FD = 3;

// Defence in depth: the host refuses flags and variables that widen a guest's
// permissions, but should a new way appear, a guest that holds any grant beyond
// the filesystem stops here, before user code runs.
const permission = (process as { permission?: { has(scope: string): boolean } }).permission;
const widened = ["net", "child", "worker", "addon", "wasi", "inspector"].filter((scope) => !permission || permission.has(scope));
if (widened.length > 0) {
  process.stderr.write(`agentvm: refusing to run with permissions beyond the VM's (${permission ? widened.join(", ") : "no permission model"})\n`);
  process.exit(126);
}

export const kernel = new KernelClient(KERNEL_FD);
// The VM's listen(0) range, given at launch; read once, then gone from the environment.
const range = /^(\d+)-(\d+)$/.exec(process.env.AGENTVM_PORT_RANGE ?? "");
delete process.env.AGENTVM_PORT_RANGE;
installNetPatch(kernel, range ? [Number(range[1]), Number(range[2])] : undefined);
installTlsPatch();
installDnsPatch(kernel);
installDgramPatch(kernel);
installChildProcessPatch(kernel);
// ESM `import { spawn } from "node:child_process"` reads a snapshot of the exports: refresh it.
syncBuiltinESMExports();

// A directly started guest learns its VM pid from the environment (pooled guests get it with their program).
for (const [key, name] of [["AGENTVM_PID", "pid"], ["AGENTVM_PPID", "ppid"]] as const) {
  const value = Number(process.env[key]);
  delete process.env[key];
  // ppid 0: started by the host, as pooled guests report it too.
  if (Number.isInteger(value) && value >= 0) Object.defineProperty(process, name, { value, enumerable: true, configurable: true });
}
