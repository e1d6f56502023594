/**
 * Directories as tar streams through a real server: a round trip keeps modes
 * and symlinks; hostile archives (`..` names, symlink-then-file tricks, links
 * to host paths, setuid bits) write nothing outside the target directory, let
 * alone outside the VM.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, rename, writeFile } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { createClient, type VmHandle } from "agentvm/client";
import { openFilesUnder, rejection, tempDataDir, text, waitFor } from "./helpers.ts";
import { archive, type Entry } from "./tar-fixtures.ts";
import * as tar from "tar-stream";
import { VmFilesystem } from "../src/sandbox/filesystem.ts";
import { packDirectory } from "../src/sandbox/vm-tar.ts";



/** What a directory holds, as the guest sees it: path, type, permission bits, link target. */
async function listing(vm: VmHandle, dir: string): Promise<string[]> {
  const script = `
    const fs = require("fs"), path = require("path");
    const out = [];
    (function walk(d, rel) {
      for (const name of fs.readdirSync(d).sort()) {
        const p = path.join(d, name), st = fs.lstatSync(p), r = rel + name;
        const type = st.isSymbolicLink() ? "l" : st.isDirectory() ? "d" : "f";
        out.push([r, type, (st.mode & 0o7777).toString(8), type === "l" ? fs.readlinkSync(p) : type === "f" ? fs.readFileSync(p, "utf8") : ""].join(" "));
        if (type === "d") walk(p, r + "/");
      }
    })(process.argv[1], "");
    console.log(out.join("\\n"));`;
  const result = await vm.exec("node", ["-e", script, dir]);
  assert.equal(result.exitCode, 0, result.stderr);
  return result.stdout.trim().split("\n");
}

describe("directories as tar streams", () => {
  let server: RunningServer;
  let vm: VmHandle;
  let dataDir: string;

  before(async () => {
    dataDir = await tempDataDir("agentvm-tar-");
    const registry = setup({ use: { vm: agentOS() } });
    server = await registry.start({ port: 0, dataDir, handleSignals: false });
    vm = createClient<typeof registry>(server.url).vm.getOrCreate("tar");
  });
  after(() => server.close());

  it("round trip keeps files, modes, empty directories and symlinks", async () => {
    const setupScript = [
      "mkdir -p src/bin src/empty src/private",
      "printf 'run' > src/bin/tool && chmod 755 src/bin/tool",
      "printf 'secret' > src/private/key && chmod 600 src/private/key && chmod 700 src/private",
      ": > src/empty-file",
      "ln -s bin/tool src/relative-link",
      "ln -s /etc/hostname src/absolute-link",
      "ln -s missing src/dangling",
    ].join(" && ");
    assert.equal((await vm.exec("sh", ["-c", setupScript], { cwd: "/home/agentos" })).exitCode, 0);
    const before = await listing(vm, "/home/agentos/src");
    const bytes = new Uint8Array(await new Response(await vm.downloadTar("/home/agentos/src")).arrayBuffer());
    const result = await vm.uploadTar("/home/agentos/copy", bytes);
    assert.deepEqual(result, { files: 3, directories: 3, symlinks: 3, skipped: 0 });
    assert.deepEqual(await listing(vm, "/home/agentos/copy"), before);
    assert.ok(before.some((line) => line.startsWith("private d 700")), before.join("\n"));
    assert.ok(before.includes("private/key f 600 secret"), before.join("\n"));
    assert.ok(before.includes("bin/tool f 755 run"), before.join("\n"));
    assert.ok(before.includes("relative-link l 777 bin/tool"), before.join("\n"));
    // What extraction made (files, directories, symlinks) belongs to the VM's guests, as if they had made it.
    const foreign = await vm.exec("sh", ["-c", 'find /home/agentos/copy \\( ! -user "$(id -u)" -o ! -group "$(id -g)" \\) -print']);
    assert.equal(foreign.exitCode, 0, foreign.stderr);
    assert.equal(foreign.stdout, "");
  });

  it("streams a tar body from a ReadableStream, and reports progress", async () => {
    const bytes = await archive([{ name: "a.txt", content: "A" }, { name: "dir/", type: "directory", mode: 0o755 }, { name: "dir/b.txt", content: "B" }]);
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < bytes.length; i += 512) controller.enqueue(bytes.subarray(i, i + 512));
        controller.close();
      },
    });
    assert.deepEqual(await vm.uploadTar("/home/agentos/streamed", body, { onProgress: (p) => (sent = p.bytes) }), { files: 2, directories: 1, symlinks: 0, skipped: 0 });
    assert.equal(sent, bytes.length);
    assert.equal(text(await vm.readFile("/home/agentos/streamed/dir/b.txt")), "B");
  });

  it("strips setuid, setgid and sticky bits; skips hard links", async () => {
    const bytes = await archive([
      { name: "suid", mode: 0o4755, content: "x" },
      { name: "sgid-dir/", type: "directory", mode: 0o3775 },
      { name: "hard", type: "link", linkname: "suid" },
    ]);
    assert.deepEqual(await vm.uploadTar("/home/agentos/modes", bytes), { files: 1, directories: 1, symlinks: 0, skipped: 1 });
    assert.equal((await vm.stat("/home/agentos/modes/suid")).mode & 0o7777, 0o755);
    assert.equal((await vm.stat("/home/agentos/modes/sgid-dir")).mode & 0o7777, 0o775);
    assert.equal(await vm.exists("/home/agentos/modes/hard"), false);
  });

  it("hostile archives write nothing outside the target directory", async () => {
    const hostDir = join(dataDir, "host-target");
    await mkdir(hostDir, { recursive: true });
    await writeFile(join(dataDir, "host-file"), "host");
    await vm.writeFile("/home/agentos/victim.txt", "untouched");
    // A symlink already in the target directory (made by a guest) that leads out of it.
    await vm.mkdir("/home/agentos/x/pre", { recursive: true });
    await vm.exec("ln", ["-s", "/home/agentos", "/home/agentos/x/pre/out"]);

    const cases: [string, Entry[]][] = [
      ["a `..` name", [{ name: "../../../../../../escape.txt", content: "pwned" }]],
      ["a `..` name after ordinary ones", [{ name: "ok.txt", content: "fine" }, { name: "sub/../../escape.txt", content: "pwned" }]],
      ["an absolute symlink, then a file through it", [{ name: "root-link", type: "symlink", linkname: "/" }, { name: "root-link/escape.txt", content: "pwned" }]],
      ["a climbing symlink, then a file through it", [{ name: "up", type: "symlink", linkname: "../../../../../../.." }, { name: "up/escape.txt", content: "pwned" }]],
      ["a symlink to a host path, then a file through it", [{ name: "host", type: "symlink", linkname: hostDir }, { name: "host/escape.txt", content: "pwned" }]],
      ["a symlink to a host path, then a directory through it", [{ name: "host2", type: "symlink", linkname: dataDir }, { name: "host2/newdir/", type: "directory" }]],
      ["a symlink to the home, then a symlink through it", [{ name: "home", type: "symlink", linkname: "/home/agentos" }, { name: "home/victim.txt", type: "symlink", linkname: "/etc/passwd" }]],
      ["a file through a symlink the guest made", [{ name: "pre/out/victim.txt", content: "pwned" }]],
    ];
    for (const [what, entries] of cases) {
      const error = await rejection(vm.uploadTar("/home/agentos/x", await archive(entries)));
      assert.equal(error.code, "PATH_OUTSIDE_VM", `${what}: ${error.message}`);
    }
    // A file entry where the archive put a symlink replaces the link, never writes through it.
    await vm.uploadTar("/home/agentos/y", await archive([{ name: "s", type: "symlink", linkname: "/home/agentos/victim.txt" }, { name: "s", content: "replaced" }]));
    assert.equal(text(await vm.readFile("/home/agentos/y/s")), "replaced");
    assert.equal((await vm.exec("sh", ["-c", "test -L /home/agentos/y/s || echo regular"])).stdout, "regular\n");

    assert.equal(text(await vm.readFile("/home/agentos/victim.txt")), "untouched");
    // Inside the VM, read through it (its disk is mounted only while the server holds the VM); on the host, directly.
    for (const path of ["/escape.txt", "/home/escape.txt", "/home/agentos/escape.txt"]) {
      assert.equal(await vm.exists(path), false, `${path} was written in the VM`);
    }
    for (const path of [join(hostDir, "escape.txt"), join(dataDir, "newdir"), join(dataDir, "escape.txt")]) {
      assert.equal(existsSync(path), false, `${path} was written on the host`);
    }
    assert.equal(readFileSync(join(dataDir, "host-file"), "utf8"), "host");
    assert.equal(text(await vm.readFile("/home/agentos/x/ok.txt")), "fine");
  });

  it("a reader that walks away mid-archive leaves no open file", async () => {
    const vmRoot = join(dataDir, "vms", "tar", "root");
    await vm.exec("sh", ["-c", "mkdir -p /home/agentos/large && head -c 67108864 /dev/zero > /home/agentos/large/zeros"]);
    const controller = new AbortController();
    const reader = (await vm.downloadTar("/home/agentos/large", { signal: controller.signal })).getReader();
    await reader.read();
    controller.abort();
    await reader.read().catch(() => undefined);
    await waitFor(() => openFilesUnder(process.pid, vmRoot).length === 0, "the server to close the file of the abandoned archive");
  });

  it("an archive upload that breaks off leaves no half-written file", async () => {
    const full = await archive([{ name: "done.txt", content: "complete" }, { name: "big.bin", content: "y".repeat(4 * 1024 * 1024) }]);
    await new Promise<void>((resolve) => {
      const req = httpRequest(`${server.url}/api/vm/tar/tar/home/agentos/partial`, { method: "PUT", headers: { "content-type": "application/x-tar", "content-length": String(full.length) } });
      req.on("error", () => resolve());
      req.write(full.subarray(0, 2 * 1024 * 1024), () =>
        setTimeout(() => {
          req.destroy();
          resolve();
        }, 300),
      );
    });
    const dir = join(dataDir, "vms", "tar", "root", "home", "agentos", "partial");
    await waitFor(
      async () => (await vm.exists("/home/agentos/partial")) && (await vm.readdir("/home/agentos/partial")).every((name) => !name.startsWith(".agentvm-")),
      "the broken-off entry's temporary file to be removed",
    );
    assert.equal(await vm.exists("/home/agentos/partial/big.bin"), false);
    assert.equal(text(await vm.readFile("/home/agentos/partial/done.txt")), "complete");
    await waitFor(() => openFilesUnder(process.pid, dir).length === 0, "no open file in the target directory");
  });

  it("a refused entry early in a large archive is answered with the typed error, not a reset", async () => {
    const bytes = await archive([{ name: "../escape.txt", content: "pwned" }, { name: "big.bin", content: "z".repeat(16 * 1024 * 1024) }]);
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < bytes.length; i += 64 * 1024) controller.enqueue(bytes.subarray(i, i + 64 * 1024));
        controller.close();
      },
    });
    assert.equal((await rejection(vm.uploadTar("/home/agentos/early", body))).code, "PATH_OUTSIDE_VM");
    assert.equal(await vm.exists("/home/agentos/early/big.bin"), false);
  });

  it("bad input: not a directory, not a tar, a missing directory", async () => {
    await vm.writeFile("/home/agentos/plain", "x");
    assert.equal((await rejection(vm.downloadTar("/home/agentos/plain"))).code, "ENOTDIR");
    assert.equal((await rejection(vm.downloadTar("/home/agentos/none"))).code, "ENOENT");
    assert.equal((await rejection(vm.uploadTar("/home/agentos/z", new TextEncoder().encode("this is not a tar archive at all ".repeat(40))))).code, "MALFORMED_REQUEST");
    assert.equal((await rejection(vm.uploadTar("/usr/lib", await archive([{ name: "a", content: "x" }])))).code, "EROFS");
  });
});

describe("packing walks the directories it opened", () => {
  it("a directory renamed away (and another put in its place) while it is packed is packed whole, from the one opened", async () => {
    const root = await tempDataDir("agentvm-tar-walk-");
    const dir = join(root, "home/agentos/walk");
    await mkdir(dir, { recursive: true });
    // 20 × 64 KiB: far more than the pack buffers before its reader asks for more.
    const content = (i: number) => `${String(i).padStart(4, "0")}`.repeat(16 * 1024);
    for (let i = 0; i < 20; i++) await writeFile(join(dir, `f${String(i).padStart(2, "0")}`), content(i));
    const stream = await packDirectory(new VmFilesystem(root), "/home/agentos/walk");
    const extract = tar.extract();
    const names: string[] = [];
    const bodies = new Map<string, string>();
    const reading = (async () => {
      for await (const entry of extract) {
        const chunks: Buffer[] = [];
        for await (const chunk of entry as AsyncIterable<Buffer>) chunks.push(chunk);
        names.push(entry.header.name);
        bodies.set(entry.header.name, Buffer.concat(chunks).toString());
      }
    })();
    const iterator = stream[Symbol.asyncIterator]();
    // The first chunk is out, and the pack waits for its reader: now the directory moves.
    const first = await iterator.next();
    extract.write(first.value as Buffer);
    await rename(dir, join(root, "home/agentos/moved"));
    await mkdir(dir);
    await writeFile(join(dir, "f05"), "a stranger");
    for (let next = await iterator.next(); !next.done; next = await iterator.next()) extract.write(next.value as Buffer);
    (extract as unknown as { end(): void }).end();
    await reading;
    assert.deepEqual(names, Array.from({ length: 20 }, (_, i) => `f${String(i).padStart(2, "0")}`));
    for (let i = 0; i < 20; i++) assert.equal(bodies.get(`f${String(i).padStart(2, "0")}`), content(i), `f${i} is the original`);
  });
});
