/**
 * Disk caps where the kernel cannot hold them (a server without root, no
 * e2fsprogs or loop devices; here forced with AGENTVM_DISK_IMAGES=0): the
 * server measures the VM's directory, refuses writes and spawns at a cap, and
 * stops guests it finds past one. Observed on the host: the size of what the
 * guest wrote, and the VM's processes.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { tempDataDir, testVm, waitFor } from "./helpers.ts";

process.env.AGENTVM_DISK_IMAGES = "0";
const CAP = 16 * 1024 * 1024;

describe("disk caps held by the server (no disk image)", () => {
  it("writeFile and spawn get VM_DISK_FULL at the cap; deleting files frees the VM", async () => {
    const vm = await testVm(await tempDataDir(), { name: "plain", limits: { diskBytes: CAP } });
    assert.equal((await vm.usage()).disk.capped, false);
    await vm.writeFile("/home/agentos/big.bin", new Uint8Array(CAP + 1024 * 1024).fill(1));
    await waitFor(async () => (await vm.usage()).disk.bytes > CAP, "the measurement to see the write", 10_000, 500);
    await assert.rejects(vm.writeFile("/home/agentos/more.txt", "x"), (error: { code?: string }) => error.code === "VM_DISK_FULL");
    await assert.rejects(vm.spawn("/bin/true"), (error: { code?: string }) => error.code === "VM_DISK_FULL");
    await vm.deleteFile("/home/agentos/big.bin");
    await waitFor(async () => (await vm.usage()).disk.bytes < CAP, "the measurement to see the delete", 10_000, 500);
    assert.equal((await vm.exec("/bin/echo", ["room again"])).stdout, "room again\n");
  });

  it("a guest writing past the cap is stopped", async () => {
    const vm = await testVm(await tempDataDir(), { name: "filler", limits: { diskBytes: CAP } });
    // 1 MiB every 50 ms, for at most 60 s (1.2 GB) unless stopped.
    const writing = vm.exec("/bin/sh", ["-c", "i=0; while [ $i -lt 1200 ]; do head -c 1048576 /dev/zero >> /tmp/fill; sleep 0.05; i=$((i+1)); done; echo finished"]).catch((error: { code?: string }) => error);
    const outcome = await writing;
    assert.ok(!("stdout" in outcome && /finished/.test(String(outcome.stdout))), "the guest wrote on to the end");
    const written = (await stat(join(vm.root, "tmp/fill"))).size;
    assert.ok(written < 600 * 1024 * 1024, `the guest wrote ${written} bytes`);
    assert.deepEqual((await vm.listProcesses()).filter((info) => info.running), []);
  });
});
