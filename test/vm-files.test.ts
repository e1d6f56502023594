/**
 * End to end: the VM's files through the embedded API, and what real guests
 * see of them. No mocks: guests are real Node processes in the sandbox.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFile as hostReadFile, writeFile as hostWriteFile, readdir as hostReaddir } from "node:fs/promises";
import { join } from "node:path";
import { collectOutput, rejection, tempDataDir, testVm, text } from "./helpers.ts";

const dataDir = await tempDataDir("agentvm-files-");
const vm = await testVm(dataDir, { name: "files" });
const SECRET = "host-only secret 7c1f; a VM must never read this";
/** A host file next to the VM directory, outside its root. */
const secretPath = join(dataDir, "secret.txt");
await hostWriteFile(secretPath, SECRET);
const hostPasswd = await hostReadFile("/etc/passwd", "utf8");

/** Runs a guest script to completion; returns its exit code and output. */
async function runGuest(source: string, file = "/home/agentos/guest.cjs"): Promise<{ code: number; stdout: string; stderr: string }> {
  await vm.writeFile(file, source);
  const { pid } = await vm.spawn("node", [file]);
  const output = collectOutput(vm, pid);
  const code = await vm.waitProcess(pid);
  // Output is delivered before the exit event; one more turn for stragglers.
  await new Promise((resolve) => setImmediate(resolve));
  output.stop();
  return { code, stdout: output.stdout, stderr: output.stderr };
}

async function assertRejects(promise: Promise<unknown> | (() => unknown), code: string, mentions?: string): Promise<Error> {
  const error = await rejection(promise);
  assert.equal(error.code, code, `expected ${code}, got ${error.code}: ${error.message}`);
  assert.ok(!error.message.includes(vm.root), `message leaks the host path: ${error.message}`);
  if (mentions !== undefined) assert.ok(error.message.includes(mentions), `message should name ${mentions}: ${error.message}`);
  return error;
}

describe("vm files: host API", () => {
  it("round-trips a string and binary bytes", async () => {
    await vm.writeFile("/home/agentos/hello.txt", "héllo wörld ✓");
    const bytes = await vm.readFile("/home/agentos/hello.txt");
    assert.ok(bytes instanceof Uint8Array);
    assert.equal(text(bytes), "héllo wörld ✓");

    const binary = new Uint8Array(70_000).map((_, i) => (i * 31 + 7) & 0xff);
    binary[0] = 0;
    binary[1] = 0xff;
    await vm.writeFile("/data/blob.bin", binary);
    assert.deepEqual(new Uint8Array(await vm.readFile("/data/blob.bin")), binary);
    // Really on disk under the VM root.
    assert.deepEqual(new Uint8Array(await hostReadFile(join(vm.root, "data/blob.bin"))), binary);
  });

  it("overwrites, and relative paths are in /home/agentos", async () => {
    await vm.writeFile("notes/rel.txt", "first, longer version");
    await vm.writeFile("notes/rel.txt", "second");
    assert.equal(text(await vm.readFile("/home/agentos/notes/rel.txt")), "second");
  });

  it("mkdir, readdir, stat, exists, move and deleteFile", async () => {
    await vm.mkdir("/work-area/a/b", { recursive: true });
    await vm.mkdir("/work-area/a/b", { recursive: true }); // idempotent
    await assertRejects(vm.mkdir("/work-area/a"), "EEXIST", "/work-area/a");
    await assertRejects(vm.mkdir("/work-area/x/y"), "ENOENT", "/work-area/x/y");
    await vm.writeFile("/work-area/a/one.txt", "1");
    await vm.writeFile("/work-area/a/two.txt", "22");
    assert.deepEqual(await vm.readdir("/work-area/a"), ["b", "one.txt", "two.txt"]);

    const fileStat = await vm.stat("/work-area/a/two.txt");
    assert.equal(fileStat.type, "file");
    assert.equal(fileStat.isFile, true);
    assert.equal(fileStat.isDirectory, false);
    assert.equal(fileStat.size, 2);
    const dirStat = await vm.stat("/work-area/a/b");
    assert.equal(dirStat.type, "directory");
    assert.equal(dirStat.isDirectory, true);

    assert.equal(await vm.exists("/work-area/a/one.txt"), true);
    assert.equal(await vm.exists("/work-area/a/none.txt"), false);
    assert.equal(await vm.exists("/work-area/a/one.txt/below"), false);

    await vm.move("/work-area/a/one.txt", "/work-area/moved/uno.txt");
    assert.equal(await vm.exists("/work-area/a/one.txt"), false);
    assert.equal(text(await vm.readFile("/work-area/moved/uno.txt")), "1");

    await vm.deleteFile("/work-area/a/two.txt");
    assert.equal(await vm.exists("/work-area/a/two.txt"), false);
    await assertRejects(vm.deleteFile("/work-area/a"), "EISDIR", "/work-area/a");
    await vm.deleteFile("/work-area", { recursive: true });
    assert.equal(await vm.exists("/work-area"), false);
    await vm.remove("/work-area/never", { recursive: true }).then(
      () => assert.fail("deleting a missing path must fail"),
      (error: { code?: string }) => assert.equal(error.code, "ENOENT"),
    );
  });

  it("a missing file is ENOENT with a message naming the path", async () => {
    await assertRejects(vm.readFile("/home/agentos/no-such-file.txt"), "ENOENT", "/home/agentos/no-such-file.txt");
    await assertRejects(vm.stat("/nowhere/at/all"), "ENOENT", "/nowhere/at/all");
    await assertRejects(vm.readdir("/missing-dir"), "ENOENT", "/missing-dir");
    await assertRejects(vm.move("/missing-src", "/dst"), "ENOENT", "/missing-src");
    await assertRejects(vm.deleteFile("/home/agentos/gone.txt"), "ENOENT", "/home/agentos/gone.txt");
  });

  it("bad arguments are INVALID_ARGUMENT naming the argument", async () => {
    const loose = vm as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const call = (method: string, ...args: unknown[]) => () => loose[method]!.apply(vm, args);
    await assertRejects(call("writeFile", 42, "x"), "INVALID_ARGUMENT", "path");
    await assertRejects(call("writeFile", "/a.txt", 42), "INVALID_ARGUMENT", "content");
    await assertRejects(call("writeFile", "/a.txt", { not: "bytes" }), "INVALID_ARGUMENT", "content");
    await assertRejects(call("readFile", undefined), "INVALID_ARGUMENT", "path");
    await assertRejects(call("readFile", ""), "INVALID_ARGUMENT", "path");
    await assertRejects(call("readFile", "/a\0b"), "INVALID_ARGUMENT", "NUL");
    await assertRejects(call("mkdir", "/d", { recursive: "yes" }), "INVALID_ARGUMENT", "recursive");
    await assertRejects(call("mkdir", "/d", { recrusive: true }), "INVALID_ARGUMENT", "recrusive");
    await assertRejects(call("readdir", null), "INVALID_ARGUMENT", "path");
    await assertRejects(call("stat", ["/"]), "INVALID_ARGUMENT", "path");
    await assertRejects(call("exists", 7), "INVALID_ARGUMENT", "path");
    await assertRejects(call("deleteFile", "/x", "recursive"), "INVALID_ARGUMENT", "options");
    await assertRejects(call("move", "/a.txt", 5), "INVALID_ARGUMENT", "to");
    await assertRejects(call("move", 5, "/b.txt"), "INVALID_ARGUMENT", "from");
    await assertRejects(call("readFile", "x".repeat(5000)), "INVALID_ARGUMENT", "path");
  });

  it("system directories are read-only and the home directory cannot be deleted", async () => {
    await assertRejects(vm.writeFile("/usr/evil.txt", "x"), "EROFS", "/usr");
    await assertRejects(vm.writeFile("/opt/node/bin/node", "x"), "EROFS", "/opt/node");
    await assertRejects(vm.deleteFile("/home/agentos", { recursive: true }), "EPERM", "/home/agentos");
    await assertRejects(vm.deleteFile("/", { recursive: true }), "EPERM");
    assert.equal(await vm.exists("/home/agentos"), true);
  });
});

describe("vm files: host path escapes", () => {
  it("'..' is clamped at the VM root", async () => {
    // Relative to /home/agentos, ../../../.. climbs to the VM's /, never above.
    const up = "../".repeat(20);
    await assertRejects(vm.readFile(`${up}secret.txt`), "ENOENT", "/secret.txt");
    await assertRejects(vm.readFile(`/../../..${secretPath}`), "ENOENT");
    await assertRejects(vm.readFile(secretPath), "ENOENT");
    const passwd = text(await vm.readFile(`/home/../../../etc/passwd`));
    assert.notEqual(passwd, hostPasswd);
    assert.match(passwd, /^root:x:0:0:root:\/home\/agentos:/m);
    await vm.writeFile(`${up}tmp/escaped.txt`, "stays inside");
    assert.equal(await hostReadFile(join(vm.root, "tmp/escaped.txt"), "utf8"), "stays inside");
    assert.ok(!(await hostReaddir(dataDir)).includes("escaped.txt"));
  });

  it("symlinks made by a guest never lead the host API out of the VM", async () => {
    const result = await runGuest(`
      const fs = require("fs");
      fs.mkdirSync("/home/agentos/links", { recursive: true });
      process.chdir("/home/agentos/links");
      fs.symlinkSync("/etc/passwd", "passwd");
      fs.symlinkSync(${JSON.stringify(secretPath)}, "secret-abs");
      fs.symlinkSync("../../../../../../../../..", "up");
      fs.symlinkSync("up/etc", "up-etc");
      fs.symlinkSync("loop-b", "loop-a");
      fs.symlinkSync("loop-a", "loop-b");
      fs.writeFileSync("target.txt", "guest data");
      fs.linkSync("target.txt", "hard.txt");
      console.log("made", fs.readdirSync(".").sort().join(","));
    `);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /made hard\.txt,loop-a,loop-b,passwd,secret-abs,target\.txt,up,up-etc/);

    // An absolute target is the VM's own /etc/passwd, not the host's.
    const passwd = text(await vm.readFile("/home/agentos/links/passwd"));
    assert.notEqual(passwd, hostPasswd);
    assert.match(passwd, /^root:x:0:0:root:\/home\/agentos:/m);
    assert.equal(text(await vm.readFile("/home/agentos/links/up-etc/passwd")), passwd);

    // A host path as the target names nothing inside the VM.
    await assertRejects(vm.readFile("/home/agentos/links/secret-abs"), "ENOENT");
    // Climbing with ../.. stops at the VM's /: the secret next to the VM dir is not there.
    await assertRejects(vm.readFile("/home/agentos/links/up/secret.txt"), "ENOENT");
    await assertRejects(vm.readFile(`/home/agentos/links/up${secretPath}`), "ENOENT");
    const listed = await vm.readdir("/home/agentos/links/up");
    assert.ok(listed.includes("home") && listed.includes("etc"), `up/ should be the VM's /: ${listed}`);
    assert.ok(!listed.includes("vms") && !listed.includes("secret.txt"), `up/ must not be the host: ${listed}`);
    assert.equal(await vm.exists("/home/agentos/links/secret-abs"), false);

    await assertRejects(vm.readFile("/home/agentos/links/loop-a"), "ELOOP");
    // Hard links may alias a host file; host-side access refuses them.
    await assertRejects(vm.readFile("/home/agentos/links/hard.txt"), "EPERM", "hard link");

    // Writing through a link that points at a host path lands inside the VM.
    await vm.writeFile("/home/agentos/links/secret-abs", "written through the link");
    assert.equal(await hostReadFile(secretPath, "utf8"), SECRET);
    assert.equal(await hostReadFile(join(vm.root, secretPath), "utf8"), "written through the link");

    // Deleting a link deletes the link, never its target.
    await vm.deleteFile("/home/agentos/links/passwd");
    assert.equal(await vm.exists("/etc/passwd"), true);
    assert.equal(await hostReadFile("/etc/passwd", "utf8"), hostPasswd);
  });
});

describe("vm files: what guests see", () => {
  it("a guest reads what the host wrote and the host reads what the guest wrote", async () => {
    await vm.writeFile("/home/agentos/input.txt", "from the host");
    await vm.writeFile("/tmp/scratch.txt", "tmp from the host");
    const result = await runGuest(`
      const fs = require("fs");
      const os = require("os");
      const input = fs.readFileSync("input.txt", "utf8");
      const tmp = fs.readFileSync("/tmp/scratch.txt", "utf8");
      fs.writeFileSync("output.txt", input.toUpperCase() + "|" + tmp);
      fs.writeFileSync(os.homedir() + "/home.txt", process.env.HOME);
      fs.mkdirSync("/srv/app", { recursive: true });
      fs.writeFileSync("/srv/app/root.bin", Buffer.from([0, 1, 2, 255]));
      console.log(JSON.stringify({ cwd: process.cwd(), home: os.homedir(), envHome: process.env.HOME }));
    `);
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), { cwd: "/home/agentos", home: "/home/agentos", envHome: "/home/agentos" });
    assert.equal(text(await vm.readFile("/home/agentos/output.txt")), "FROM THE HOST|tmp from the host");
    assert.equal(text(await vm.readFile("home.txt")), "/home/agentos");
    assert.deepEqual([...(await vm.readFile("/srv/app/root.bin"))], [0, 1, 2, 255]);
    assert.deepEqual(await vm.readdir("/srv/app"), ["root.bin"]);
  });

  it("the guest's / is the VM directory, and host files are not in it", async () => {
    await vm.writeFile("/marker-at-root.txt", "root marker");
    const probe = {
      root: "fs.readdirSync('/')",
      marker: "fs.readFileSync('/marker-at-root.txt', 'utf8')",
      work: "fs.existsSync('/work')",
      // (An earlier test made the path of the secret inside the VM; content tells them apart.)
      vmsDir: `fs.existsSync(${JSON.stringify(join(dataDir, "vms"))})`,
      secret: `fs.readFileSync(${JSON.stringify(secretPath)}, "utf8")`,
      vmRoot: `fs.existsSync(${JSON.stringify(vm.root)})`,
      passwd: "fs.readFileSync('/etc/passwd', 'utf8')",
      home: "fs.readdirSync('/home')",
    };
    const result = await runGuest(`
      const fs = require("fs");
      const out = {};
      ${Object.entries(probe)
        .map(([key, expr]) => `try { out.${key} = ${expr}; } catch (e) { out.${key} = "error " + e.code; }`)
        .join("\n")}
      console.log(JSON.stringify(out));
    `);
    assert.equal(result.code, 0, result.stderr);
    const seen = JSON.parse(result.stdout) as Record<string, unknown>;
    const rootList = seen.root as string[];
    assert.ok(Array.isArray(rootList), String(seen.root));
    for (const entry of ["home", "tmp", "etc", "marker-at-root.txt", "srv"]) {
      assert.ok(rootList.includes(entry), `guest / lacks ${entry}: ${rootList}`);
    }
    assert.ok(!rootList.includes("work") && !rootList.includes("vms"), `guest / shows host entries: ${rootList}`);
    assert.deepEqual(rootList.filter((n) => !n.startsWith(".")).sort(), (await vm.readdir("/")).filter((n) => !n.startsWith(".")).sort());
    assert.equal(seen.marker, "root marker");
    assert.equal(seen.work, false);
    assert.equal(seen.vmsDir, false);
    assert.notEqual(seen.secret, SECRET);
    assert.equal(seen.vmRoot, false);
    assert.notEqual(seen.passwd, hostPasswd);
    assert.equal(seen.passwd, text(await vm.readFile("/etc/passwd")));
    assert.deepEqual(seen.home, ["agentos"]);
  });

  it("ESM guests import files relative to themselves", async () => {
    await vm.writeFile("/home/agentos/esm/lib.mjs", "export const answer = 6 * 7;\n");
    const result = await runGuest(
      `import { answer } from "./lib.mjs";\nimport { readFileSync } from "node:fs";\nconsole.log("esm", answer, readFileSync(new URL("./lib.mjs", import.meta.url), "utf8").length);\n`,
      "/home/agentos/esm/main.mjs",
    );
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^esm 42 \d+\n$/);
  });
});
