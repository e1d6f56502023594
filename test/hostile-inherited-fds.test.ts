/**
 * Descriptors the server's process inherited without close-on-exec (from a
 * service manager, a shell, a log pipe) never reach a VM's programs. The
 * server runs in a child process that is given such a descriptor (fd 7, a
 * pipe the test holds the other end of); a program in the VM lists its own
 * descriptors, and writes to fd 7 as a hostile guest would.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { Readable } from "node:stream";
import { tempDataDir } from "./helpers.ts";

const SERVER = `
import { createVm } from "agentvm";
const vm = await createVm({ dataDir: process.argv[1] });
try {
  const listing = await vm.exec("sh", ["-c", "ls /proc/$$/fd; echo hostile >&7 && echo wrote-to-7"]);
  console.log(JSON.stringify({ fds: listing.stdout.trim().split(/\\s+/).filter((fd) => /^\\d+$/.test(fd)).map(Number), stdout: listing.stdout }));
} finally {
  await vm.dispose();
}
`;

test("a descriptor the server inherited without close-on-exec is not open in the VM's programs", async () => {
  const dataDir = await tempDataDir();
  const child = spawn(process.execPath, ["--conditions=agentvm-source", "--input-type=module", "-e", SERVER, dataDir], {
    cwd: fileURLToPath(new URL("..", import.meta.url)),
    stdio: ["ignore", "pipe", "pipe", "ignore", "ignore", "ignore", "ignore", "pipe"],
  });
  const read = (stream: Readable) => {
    let text = "";
    stream.setEncoding("utf8");
    stream.on("data", (chunk: string) => (text += chunk));
    return () => text;
  };
  const stdout = read(child.stdout!);
  const stderr = read(child.stderr!);
  const leaked = read((child.stdio as unknown as Readable[])[7]!);
  const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
  assert.equal(code, 0, stderr());
  const line = stdout().split("\n").find((entry) => entry.startsWith("{"));
  assert.ok(line, `no result from the server process: ${stdout()} ${stderr()}`);
  const result = JSON.parse(line) as { fds: number[]; stdout: string };
  assert.deepEqual(result.fds, [0, 1, 2], `descriptors open in the guest: ${result.stdout}`);
  assert.ok(!result.stdout.includes("wrote-to-7"));
  assert.equal(leaked(), "");
});
