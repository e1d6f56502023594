/** UDP on the VM's loopback: placeholder replaced below. */
import type { KernelClient } from "./kernel-client.ts";
export function installDgramPatch(_kernel: KernelClient): void {}
