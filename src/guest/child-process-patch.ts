import type { KernelClient } from "./kernel-client.ts";
export function installChildProcessPatch(_kernel: KernelClient): void {}
