import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { VmFilesystem } from "./filesystem.ts";

let base: string;
let root: string;
let outside: string;
let vm: VmFilesystem;
const SECRET = "host secret, must never be read through the VM";

before(async () => {
  base = await fs.realpath(await fs.mkdtemp(path.join(os.tmpdir(), "agentvm-fs-test-")));
  root = path.join(base, "root");
  outside = path.join(base, "outside");
  await fs.mkdir(path.join(root, "home", "agentos"), { recursive: true });
  await fs.mkdir(outside);
  await fs.writeFile(path.join(outside, "secret.txt"), SECRET);
  vm = new VmFilesystem(root);
});

after(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

/**
 * Asserts the promise rejects with `code` and a message that never names the
 * host root. (A guest symlink may itself spell a host-looking path, and the
 * message may echo that guest path back, so the check is on `root`.)
 */
async function rejectsWith(promise: Promise<unknown>, code: string, mentions?: string): Promise<Error & { code: string }> {
  let caught: unknown;
  try {
    await promise;
  } catch (err) {
    caught = err;
  }
  assert.ok(caught, `expected a rejection with ${code}`);
  const err = caught as Error & { code: string };
  assert.equal(err.code, code, err.message);
  assert.ok(!err.message.includes(root), `message leaks the host path: ${err.message}`);
  if (mentions) assert.ok(err.message.includes(mentions), `message should mention ${mentions}: ${err.message}`);
  return err;
}

const text = (bytes: Uint8Array) => Buffer.from(bytes).toString("utf8");

describe("VmFilesystem", () => {
  describe("read and write", () => {
    it("round-trips text and binary bytes, creating parent directories", async () => {
      await vm.writeFile("/data/deep/nested/a.txt", "hello");
      assert.equal(text(await vm.readFile("/data/deep/nested/a.txt")), "hello");
      assert.equal(await fs.readFile(path.join(root, "data/deep/nested/a.txt"), "utf8"), "hello");

      const binary = new Uint8Array(256).map((_, i) => i);
      await vm.writeFile("/data/bin", binary);
      assert.deepEqual(new Uint8Array(await vm.readFile("/data/bin")), binary);
    });

    it("replaces content with mode 0644 and leaves no temp files", async () => {
      await vm.writeFile("/data/replace.txt", "a much longer first version");
      await vm.writeFile("/data/replace.txt", "short");
      assert.equal(text(await vm.readFile("/data/replace.txt")), "short");
      assert.equal((await vm.stat("/data/replace.txt")).mode & 0o777, 0o644);
      assert.deepEqual(
        (await vm.readdir("/data")).filter((n) => n.endsWith(".tmp")),
        [],
      );
    });

    it("puts relative paths in /home/agentos", async () => {
      await vm.writeFile("notes/rel.txt", "relative");
      assert.equal(await fs.readFile(path.join(root, "home/agentos/notes/rel.txt"), "utf8"), "relative");
      assert.equal(text(await vm.readFile("/home/agentos/notes/rel.txt")), "relative");
      assert.equal(text(await vm.readFile("./notes/../notes/rel.txt")), "relative");
    });

    it("clamps .. at the VM root", async () => {
      await vm.writeFile("/../../x", "clamped");
      assert.equal(await fs.readFile(path.join(root, "x"), "utf8"), "clamped");
      await vm.writeFile("../../../../../y", "clamped too");
      assert.equal(await fs.readFile(path.join(root, "y"), "utf8"), "clamped too");
      await assert.rejects(fs.access(path.join(base, "x")));
      assert.equal(text(await vm.readFile("/home/../../../x")), "clamped");
    });

    it("reports missing files and directories with the guest path", async () => {
      const err = await rejectsWith(vm.readFile("missing.txt"), "ENOENT", "/home/agentos/missing.txt");
      assert.match(err.message, /^readFile /);
      assert.match(err.message, /writeFile/);
      await rejectsWith(vm.readFile("/data"), "EISDIR", "/data");
      await rejectsWith(vm.writeFile("/data", "x"), "EISDIR", "/data");
      await rejectsWith(vm.writeFile("/data/bin/child", "x"), "ENOTDIR", "/data/bin");
    });
  });

  describe("confinement", () => {
    it("interprets an absolute symlink target inside the VM, never on the host", async () => {
      const hostSecret = path.join(outside, "secret.txt");
      await fs.symlink(hostSecret, path.join(root, "home/agentos/link"));
      // The same path inside the VM does not exist: ENOENT, not the host file.
      await rejectsWith(vm.readFile("link"), "ENOENT", "/home/agentos/link");
      assert.equal(await vm.exists("link"), false);

      // Once it exists inside the VM, the link reads the VM's copy.
      await vm.writeFile(hostSecret, "vm copy");
      assert.equal(text(await vm.readFile("link")), "vm copy");
      assert.equal(await fs.readFile(hostSecret, "utf8"), SECRET);
      assert.equal(await vm.hostPath("link"), path.join(root, hostSecret));
    });

    it("writes through an absolute symlink land inside the VM", async () => {
      const target = path.join(outside, "written-through.txt");
      await fs.symlink(target, path.join(root, "home/agentos/wlink"));
      await vm.writeFile("wlink", "inside");
      await assert.rejects(fs.access(target));
      assert.equal(await fs.readFile(path.join(root, target), "utf8"), "inside");
    });

    it("clamps .. in relative symlink targets at the VM root", async () => {
      await fs.symlink("../../../../../../../../etc/passwd", path.join(root, "home/agentos/up"));
      await vm.writeFile("/etc/passwd", "vm passwd");
      assert.equal(text(await vm.readFile("up")), "vm passwd");
    });

    it("resolves a symlinked parent directory inside the VM", async () => {
      const hostDir = await fs.mkdtemp(path.join(base, "outside-dir-"));
      await fs.writeFile(path.join(hostDir, "secret.txt"), SECRET);
      await fs.symlink(hostDir, path.join(root, "home/agentos/outdir"));
      await rejectsWith(vm.readFile("outdir/secret.txt"), "ENOENT", "/home/agentos/outdir/secret.txt");
      await rejectsWith(vm.readdir("outdir"), "ENOENT");

      await vm.writeFile("outdir/new.txt", "made inside");
      await assert.rejects(fs.access(path.join(hostDir, "new.txt")));
      assert.equal(await fs.readFile(path.join(root, hostDir, "new.txt"), "utf8"), "made inside");
      assert.deepEqual(await vm.readdir("outdir"), ["new.txt"]);
    });

    it("follows relative symlinks within the VM", async () => {
      await vm.writeFile("/srv/real/file.txt", "real");
      await fs.symlink("real", path.join(root, "srv/alias"));
      assert.equal(text(await vm.readFile("/srv/alias/file.txt")), "real");
      assert.deepEqual(await vm.readdir("/srv/alias"), ["file.txt"]);
    });

    it("fails symlink loops with ELOOP", async () => {
      await fs.symlink("loop-b", path.join(root, "home/agentos/loop-a"));
      await fs.symlink("loop-a", path.join(root, "home/agentos/loop-b"));
      await rejectsWith(vm.readFile("loop-a"), "ELOOP", "/home/agentos/loop-a");
      await rejectsWith(vm.exists("loop-a"), "ELOOP");
    });

    it("refuses a hard link to a file outside the VM", async (t) => {
      const victim = path.join(outside, "hard.txt");
      await fs.writeFile(victim, SECRET);
      try {
        await fs.link(victim, path.join(root, "home/agentos/hard"));
      } catch {
        t.skip("hard links are not supported here");
        return;
      }
      const err = await rejectsWith(vm.readFile("hard"), "EPERM", "/home/agentos/hard");
      assert.match(err.message, /hard link/);
      await rejectsWith(vm.writeFile("hard", "overwrite"), "EPERM", "/home/agentos/hard");
      assert.equal(await fs.readFile(victim, "utf8"), SECRET);
      // Unlinking only drops the VM's name for it.
      await vm.deleteFile("hard");
      assert.equal(await fs.readFile(victim, "utf8"), SECRET);
    });

    it("refuses FIFOs instead of hanging", async (t) => {
      const { execFileSync } = await import("node:child_process");
      try {
        execFileSync("mkfifo", [path.join(root, "home/agentos/fifo")]);
      } catch {
        t.skip("mkfifo is not available");
        return;
      }
      await rejectsWith(vm.readFile("fifo"), "EINVAL", "/home/agentos/fifo");
      assert.equal((await vm.stat("fifo")).type, "other");
    });
  });

  describe("read-only system directories", () => {
    it("refuses writes, mkdir, deletes and moves at or under them", async () => {
      await fs.mkdir(path.join(root, "usr/bin"), { recursive: true });
      await fs.writeFile(path.join(root, "usr/bin/tool"), "tool");
      const err = await rejectsWith(vm.writeFile("/usr/bin/new", "x"), "EROFS", "/usr/bin/new");
      assert.match(err.message, /read-only system directories/);
      await rejectsWith(vm.writeFile("/usr", "x"), "EROFS");
      await rejectsWith(vm.mkdir("/opt/node/lib", { recursive: true }), "EROFS");
      await rejectsWith(vm.mkdir("/proc/x"), "EROFS");
      await rejectsWith(vm.deleteFile("/usr/bin/tool"), "EROFS");
      await rejectsWith(vm.deleteFile("/opt", { recursive: true }), "EROFS");
      await rejectsWith(vm.move("/usr/bin/tool", "/home/agentos/tool"), "EROFS");
      await rejectsWith(vm.move("/x", "/bin/x"), "EROFS");
      assert.equal(text(await vm.readFile("/usr/bin/tool")), "tool");
      // Reads are fine, and /usrlocal is not /usr.
      await vm.writeFile("/usrlocal/ok", "ok");
    });

    it("refuses writes that reach them through a symlink", async () => {
      await fs.symlink("/usr/bin", path.join(root, "home/agentos/bin-link"));
      await rejectsWith(vm.writeFile("bin-link/evil", "x"), "EROFS", "/home/agentos/bin-link/evil");
    });

    it("honours a custom readOnly list", async () => {
      const custom = new VmFilesystem(root, { readOnly: ["/data/locked"] });
      await rejectsWith(custom.writeFile("/data/locked/f", "x"), "EROFS");
      await custom.writeFile("/usr/allowed-here", "x");
      await fs.rm(path.join(root, "usr/allowed-here"));
    });
  });

  describe("mkdir", () => {
    it("creates one level, or many with recursive", async () => {
      await vm.mkdir("/m");
      assert.equal((await vm.stat("/m")).type, "directory");
      await rejectsWith(vm.mkdir("/m"), "EEXIST", "/m");
      await rejectsWith(vm.mkdir("/m/a/b"), "ENOENT", "/m/a/b");
      await vm.mkdir("/m/a/b", { recursive: true });
      await vm.mkdir("/m/a/b", { recursive: true });
      assert.deepEqual(await vm.readdir("/m/a"), ["b"]);
      await vm.writeFile("/m/file", "f");
      await rejectsWith(vm.mkdir("/m/file", { recursive: true }), "EEXIST");
      await rejectsWith(vm.mkdir("/m/file/sub", { recursive: true }), "ENOTDIR");
    });
  });

  describe("readdir, stat, exists", () => {
    it("lists names sorted", async () => {
      for (const name of ["zeta", "alpha", "Beta", "mid"]) await vm.writeFile(`/listing/${name}`, name);
      await vm.mkdir("/listing/dir");
      assert.deepEqual(await vm.readdir("/listing"), ["Beta", "alpha", "dir", "mid", "zeta"]);
      await rejectsWith(vm.readdir("/listing/zeta"), "ENOTDIR", "/listing/zeta");
      await rejectsWith(vm.readdir("/nope"), "ENOENT", "/nope");
    });

    it("returns plain stat objects, following symlinks unless lstat", async () => {
      await vm.writeFile("/st/file", "12345");
      await fs.symlink("file", path.join(root, "st/link"));
      const st = await vm.stat("/st/file");
      assert.equal(st.type, "file");
      assert.equal(st.size, 5);
      assert.equal(st.isFile, true);
      assert.equal(st.isDirectory, false);
      assert.equal(st.isSymbolicLink, false);
      assert.equal(typeof st.mtimeMs, "number");
      assert.equal(typeof st.ctimeMs, "number");
      assert.equal(typeof st.mode, "number");
      assert.deepEqual(JSON.parse(JSON.stringify(st)), st);

      assert.equal((await vm.stat("/st/link")).type, "file");
      const link = await vm.lstat("/st/link");
      assert.equal(link.type, "symlink");
      assert.equal(link.isSymbolicLink, true);
      assert.equal((await vm.stat("/st")).isDirectory, true);
      assert.equal((await vm.stat("/")).type, "directory");
      await rejectsWith(vm.stat("/st/none"), "ENOENT", "/st/none");
    });

    it("exists is false for missing, through-a-file and dangling paths", async () => {
      await vm.writeFile("/ex/file", "x");
      assert.equal(await vm.exists("/ex/file"), true);
      assert.equal(await vm.exists("/ex"), true);
      assert.equal(await vm.exists("/"), true);
      assert.equal(await vm.exists("/ex/none"), false);
      assert.equal(await vm.exists("/ex/file/child"), false);
      await fs.symlink("/does/not/exist", path.join(root, "ex/dangling"));
      assert.equal(await vm.exists("/ex/dangling"), false);
      assert.equal((await vm.lstat("/ex/dangling")).type, "symlink");
    });
  });

  describe("deleteFile", () => {
    it("deletes files, and directories only with recursive", async () => {
      await vm.writeFile("/del/a/b/c.txt", "c");
      await vm.writeFile("/del/file", "f");
      await vm.deleteFile("/del/file");
      assert.equal(await vm.exists("/del/file"), false);
      const err = await rejectsWith(vm.deleteFile("/del/a"), "EISDIR", "/del/a");
      assert.match(err.message, /recursive: true/);
      await vm.deleteFile("/del/a", { recursive: true });
      assert.equal(await vm.exists("/del/a"), false);
      await rejectsWith(vm.deleteFile("/del/a"), "ENOENT", "/del/a");
    });

    it("deletes a symlink itself, not its target", async () => {
      await vm.writeFile("/del2/target", "kept");
      await vm.mkdir("/del2/dir");
      await fs.symlink("target", path.join(root, "del2/link"));
      await fs.symlink("dir", path.join(root, "del2/dirlink"));
      await vm.deleteFile("/del2/link");
      await vm.deleteFile("/del2/dirlink");
      assert.deepEqual(await vm.readdir("/del2"), ["dir", "target"]);
    });

    it("never follows symlinks out of a recursive delete", async () => {
      const keep = path.join(outside, "keep-me");
      await fs.writeFile(keep, "keep");
      await vm.mkdir("/del3/sub", { recursive: true });
      await fs.symlink(outside, path.join(root, "del3/sub/out"));
      await vm.deleteFile("/del3", { recursive: true });
      assert.equal(await fs.readFile(keep, "utf8"), "keep");
    });

    it("refuses to delete the root or home directory", async () => {
      await rejectsWith(vm.deleteFile("/", { recursive: true }), "EPERM");
      await rejectsWith(vm.deleteFile("/home/agentos", { recursive: true }), "EPERM", "/home/agentos");
      await rejectsWith(vm.deleteFile(".", { recursive: true }), "EPERM");
      await rejectsWith(vm.deleteFile("/home", { recursive: true }), "EPERM");
      await fs.symlink("/", path.join(root, "home/agentos/to-root"));
      await rejectsWith(vm.deleteFile("to-root/home/agentos", { recursive: true }), "EPERM");
      assert.equal(await vm.exists("/home/agentos"), true);
    });
  });

  describe("move", () => {
    it("renames within the VM and creates destination parents", async () => {
      await vm.writeFile("/mv/src.txt", "moving");
      await vm.move("/mv/src.txt", "/mv/new/deeper/dst.txt");
      assert.equal(await vm.exists("/mv/src.txt"), false);
      assert.equal(text(await vm.readFile("/mv/new/deeper/dst.txt")), "moving");
      await vm.move("/mv/new", "relative-moved");
      assert.equal(text(await vm.readFile("relative-moved/deeper/dst.txt")), "moving");
      await rejectsWith(vm.move("/mv/none", "/mv/x"), "ENOENT", "/mv/none");
      await rejectsWith(vm.move("relative-moved", "relative-moved/inner"), "EINVAL");
      await rejectsWith(vm.move("/home/agentos", "/elsewhere"), "EPERM");
    });

    it("moves a symlink itself", async () => {
      await vm.writeFile("/mv2/target", "t");
      await fs.symlink("/mv2/target", path.join(root, "mv2/link"));
      await vm.move("/mv2/link", "/mv2/renamed");
      assert.equal((await vm.lstat("/mv2/renamed")).type, "symlink");
      assert.equal(text(await vm.readFile("/mv2/renamed")), "t");
      assert.deepEqual(await vm.readdir("/mv2"), ["renamed", "target"]);
    });
  });

  describe("hostPath", () => {
    it("returns the confined host path, existing or not", async () => {
      assert.equal(await vm.hostPath("/"), root);
      assert.equal(await vm.hostPath("work"), path.join(root, "home/agentos/work"));
      assert.equal(await vm.hostPath("/../etc"), path.join(root, "etc"));
    });
  });

  describe("argument validation", () => {
    const bad: unknown[] = [42, "", "a\0b", "/".repeat(4097), null, undefined, {}];
    for (const value of bad) {
      it(`rejects path ${JSON.stringify(value)?.slice(0, 20)} with INVALID_ARGUMENT`, async () => {
        const anyVm = vm as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
        for (const method of ["readFile", "readdir", "stat", "lstat", "exists", "deleteFile", "mkdir", "hostPath"]) {
          await rejectsWith(anyVm[method]!.call(vm, value), "INVALID_ARGUMENT");
        }
        await rejectsWith(anyVm.writeFile!.call(vm, value, "x"), "INVALID_ARGUMENT");
        await rejectsWith(anyVm.move!.call(vm, value, "/ok"), "INVALID_ARGUMENT");
        await rejectsWith(anyVm.move!.call(vm, "/ok", value), "INVALID_ARGUMENT");
      });
    }

    it("rejects data and options of the wrong type before touching the disk", async () => {
      const anyVm = vm as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
      await rejectsWith(anyVm.writeFile!.call(vm, "/val/x", 42), "INVALID_ARGUMENT");
      await rejectsWith(anyVm.writeFile!.call(vm, "/val/x", { length: 1 }), "INVALID_ARGUMENT");
      await rejectsWith(anyVm.writeFile!.call(vm, "/val/x", null), "INVALID_ARGUMENT");
      await rejectsWith(anyVm.mkdir!.call(vm, "/val/d", { recursive: "yes" }), "INVALID_ARGUMENT");
      await rejectsWith(anyVm.mkdir!.call(vm, "/val/d", { recursiv: true }), "INVALID_ARGUMENT");
      await rejectsWith(anyVm.deleteFile!.call(vm, "/val", 5), "INVALID_ARGUMENT");
      assert.equal(await vm.exists("/val"), false);
    });

    it("rejects a relative root and bad readOnly options", () => {
      assert.throws(() => new VmFilesystem("relative/root"), { code: "INVALID_ARGUMENT" });
      assert.throws(() => new VmFilesystem(42 as unknown as string), { code: "INVALID_ARGUMENT" });
      assert.throws(() => new VmFilesystem(root, { readOnly: ["usr"] }), { code: "INVALID_ARGUMENT" });
      assert.throws(() => new VmFilesystem(root, { readOnly: "/usr" as unknown as string[] }), { code: "INVALID_ARGUMENT" });
    });

    it("fails with ENOENT and no host path when the root is gone", async () => {
      const gone = new VmFilesystem(path.join(base, "never-created"));
      await rejectsWith(gone.readFile("/x"), "ENOENT", "/x");
    });
  });
});

describe("deep paths", () => {
  it("writes and reads a file 2,000 directories deep (each level checked once, not re-walked per level)", async () => {
    const deep = `/home/agentos/deep/${Array(2000).fill("d").join("/")}/f.txt`;
    await vm.writeFile(deep, "bottom");
    assert.equal(Buffer.from(await vm.readFile(deep)).toString(), "bottom");
    assert.deepEqual(await vm.readdir(path.posix.dirname(deep)), ["f.txt"]);
  });

  it("a directory it created that is swapped for a symlink mid-write is not followed", async () => {
    // The swap is made before the write here (the race itself cannot be timed from a test):
    // an existing symlink on the path is resolved against the VM root, never the host.
    await fs.mkdir(path.join(root, "home/agentos/swap"), { recursive: true });
    await fs.symlink(outside, path.join(root, "home/agentos/swap/link"));
    await vm.writeFile("/home/agentos/swap/link/a/b/c.txt", "inside");
    await assert.rejects(fs.access(path.join(outside, "a")));
  });
});

describe("interrupted writes", () => {
  it("writeFile's temporary files are hidden from readdir", async () => {
    await vm.mkdir("/home/agentos/tmpfiles");
    await vm.writeFile("/home/agentos/tmpfiles/kept.txt", "k");
    await fs.writeFile(path.join(root, "home/agentos/tmpfiles/.agentvm-123-4-abcdef12.tmp"), "half a write");
    await fs.writeFile(path.join(root, "home/agentos/tmpfiles/.agentvm-not-ours.tmp"), "a guest's own file");
    assert.deepEqual(await vm.readdir("/home/agentos/tmpfiles"), [".agentvm-not-ours.tmp", "kept.txt"]);
  });
});
