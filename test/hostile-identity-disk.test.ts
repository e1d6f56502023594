/**
 * A hostile guest against identity, disk caps and host visibility (DESIGN §4
 * layer 3), each with a host-side observer: the owner of what a guest writes
 * as seen by the host, a host uid trying another VM's files, the host's free
 * space and another VM writing while one is full, and the text of /proc as a
 * guest sees it searched for host paths.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { lstat, mkdir, readdir, stat, statfs, symlink, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { tempDataDir, testVm } from "./helpers.ts";

const run = promisify(execFile);
const REPO = join(dirname(fileURLToPath(import.meta.url)), "..");
const asRoot = process.getuid?.() === 0;
/** The image cache (src/image/cache.ts). */
const IMAGES = process.env.AGENTVM_IMAGE_DIR ?? join(homedir(), ".cache", "agentvm", "images");

describe("guest root is never host root", { skip: !asRoot && "the server runs unprivileged: guest root is the server's own user" }, () => {
  it("files a guest creates belong on the host to the VM's own unprivileged id, different for each VM", async () => {
    const dataDir = await tempDataDir();
    const [a, b] = await Promise.all([testVm(dataDir, { name: "id-a" }), testVm(dataDir, { name: "id-b" })]);
    for (const vm of [a, b]) {
      const made = await vm.exec("/bin/sh", ["-c", "id -u; touch /home/agentos/guest-made; mkdir /tmp/guest-dir"]);
      assert.equal(made.stdout.trim(), "0", "the guest sees itself as root");
    }
    const ownerA = (await stat(join(a.root, "home/agentos/guest-made"))).uid;
    const ownerB = (await stat(join(b.root, "home/agentos/guest-made"))).uid;
    assert.notEqual(ownerA, 0);
    assert.notEqual(ownerB, 0);
    assert.notEqual(ownerA, ownerB, "each VM has an id of its own");
    assert.equal((await stat(join(a.root, "tmp/guest-dir"))).uid, ownerA);
    // What the server writes for the API belongs to the guests too, so they can change it.
    await a.writeFile("/home/agentos/api-made.txt", "from the API");
    await a.mkdir("/home/agentos/api-dir/deeper", { recursive: true });
    assert.equal((await stat(join(a.root, "home/agentos/api-made.txt"))).uid, ownerA);
    assert.equal((await stat(join(a.root, "home/agentos/api-dir/deeper"))).uid, ownerA);
    const edit = await a.exec("/bin/sh", ["-c", "echo changed >> /home/agentos/api-made.txt && rmdir /home/agentos/api-dir/deeper && echo ok"]);
    assert.equal(edit.stdout.trim(), "ok");
  });

  it("a setuid file a guest makes is not setuid-root on the host, and its disk is nosuid", async () => {
    const dataDir = await tempDataDir();
    const vm = await testVm(dataDir, { name: "setuid" });
    const result = await vm.exec("/bin/sh", ["-c", "cp /bin/true /home/agentos/su-true; chmod 4755 /home/agentos/su-true; echo chmod=$?"]);
    const planted = join(vm.root, "home/agentos/su-true");
    const found = await stat(planted).catch(() => undefined);
    if (found) {
      // Whatever the filter allowed, it is not host root's.
      assert.notEqual(found.uid, 0, result.stdout);
      const { stdout } = await run("findmnt", ["-n", "-o", "OPTIONS", "--target", planted]);
      assert.match(stdout, /nosuid/);
    }
  });

  it("one VM's id cannot read another VM's files on the host, even by their exact path", async () => {
    const dataDir = await tempDataDir();
    const [a, b] = await Promise.all([testVm(dataDir, { name: "peer-a" }), testVm(dataDir, { name: "peer-b" })]);
    await b.writeFile("/home/agentos/secret.txt", "b's secret");
    await a.exec("/bin/true");
    const idA = (await stat(join(a.root, "home/agentos"))).uid;
    const target = join(b.root, "home/agentos/secret.txt");
    await assert.rejects(run("setpriv", [`--reuid=${idA}`, `--regid=${idA}`, "--clear-groups", "cat", target]), /Permission denied/);
    // A crafted path through the files API stays in A: a guest link to B's host path names nothing in A.
    await a.exec("/bin/ln", ["-s", target, "/home/agentos/to-b"]);
    await assert.rejects(a.readFile("/home/agentos/to-b"), (error: { code?: string }) => error.code === "ENOENT");
    const guest = await a.exec("/bin/sh", ["-c", `cat ${target} 2>&1; cat /home/agentos/to-b 2>&1; true`]);
    assert.doesNotMatch(guest.stdout, /b's secret/);
  });
});

describe("disk bytes and inodes per VM", { skip: !asRoot && "without root the disk is measured, not capped" }, () => {
  it("a guest writing past limits.diskBytes gets ENOSPC, writeFile gets VM_DISK_FULL, another VM and the host are unaffected", async () => {
    const dataDir = await tempDataDir();
    const hostBefore = await statfs(dataDir);
    const full = await testVm(dataDir, { name: "disk-full", limits: { diskBytes: 32 * 1024 * 1024 } });
    const other = await testVm(dataDir, { name: "disk-other", limits: { diskBytes: 32 * 1024 * 1024 } });
    const fill = await full.exec("/bin/sh", ["-c", "head -c 200000000 /dev/zero > /tmp/fill; echo rc=$?"]);
    assert.match(fill.stderr, /No space left on device/);
    assert.match(fill.stdout, /rc=1/);
    await assert.rejects(full.writeFile("/home/agentos/more.bin", new Uint8Array(1024 * 1024)), (error: { code?: string }) => error.code === "VM_DISK_FULL");
    const usage = await full.usage();
    assert.equal(usage.disk.capped, true);
    assert.ok(usage.disk.bytes > 16 * 1024 * 1024 && usage.disk.bytes <= 32 * 1024 * 1024, `disk bytes ${usage.disk.bytes}`);
    // The neighbour writes as before.
    await other.writeFile("/home/agentos/fine.txt", "still room");
    const wrote = await other.exec("/bin/sh", ["-c", "head -c 4000000 /dev/zero > /tmp/ok && echo ok"]);
    assert.equal(wrote.stdout.trim(), "ok");
    // The host lost at most what the VM was allowed (its image is sparse), never the 200 MB asked for.
    const hostAfter = await statfs(dataDir);
    const lost = (hostBefore.bavail - hostAfter.bavail) * hostBefore.bsize;
    assert.ok(lost < 120 * 1024 * 1024, `host lost ${lost} bytes`);
    // Freeing space frees the VM.
    await full.exec("/bin/rm", ["-f", "/tmp/fill"]);
    await full.writeFile("/home/agentos/more.bin", new Uint8Array(1024 * 1024));
  });

  it("a guest creating files past limits.diskInodes gets ENOSPC; usage counts inodes", async () => {
    const dataDir = await tempDataDir();
    const vm = await testVm(dataDir, { name: "inodes", limits: { diskInodes: 2048 } });
    const result = await vm.exec("/bin/sh", ["-c", "mkdir /tmp/many; i=0; while [ $i -lt 5000 ]; do true > /tmp/many/$i || break; i=$((i+1)); done; echo made=$i"], { timeoutMs: 60_000 });
    const made = Number(/made=(\d+)/.exec(result.stdout)?.[1]);
    // The kernel rounds the inode count up to whole block groups.
    assert.ok(made > 1000 && made < 4096, `made ${made} files: ${result.stderr}`);
    assert.match(result.stderr, /No space left on device/);
    const usage = await vm.usage();
    assert.ok(usage.disk.inodes >= made, `inodes ${usage.disk.inodes}`);
  });
});

describe("a VM directory from before ids and disks", { skip: !asRoot && "ids and disks need root" }, () => {
  it("is copied into its new disk once and handed to the VM's id; its files keep working", async () => {
    const dataDir = await tempDataDir();
    const root = join(dataDir, "vms", "legacy", "root");
    await mkdir(join(root, "home/agentos/project"), { recursive: true });
    await writeFile(join(root, "home/agentos/project/old.txt"), "from before\n");
    await symlink("project/old.txt", join(root, "home/agentos/link"));
    const vm = await testVm(dataDir, { name: "legacy" });
    assert.equal(new TextDecoder().decode(await vm.readFile("/home/agentos/link")), "from before\n");
    const owner = (await stat(join(root, "home/agentos/project/old.txt"))).uid;
    assert.notEqual(owner, 0);
    assert.equal((await lstat(join(root, "home/agentos/link"))).uid, owner);
    assert.equal((await vm.usage()).disk.capped, true);
    // The old files moved into the disk; beside it only the VM's /etc files and the marker of a run in progress (see interrupted-writes.ts).
    assert.deepEqual((await readdir(join(dataDir, "vms", "legacy"))).sort(), ["disk.ext4", "etc", "root", "running"]);
    const edited = await vm.exec("/bin/sh", ["-c", "echo more >> /home/agentos/project/old.txt && cat /home/agentos/project/old.txt"]);
    assert.equal(edited.stdout, "from before\nmore\n");
  });
});

describe("nothing of the host is visible", () => {
  it("init's code is one read-only mount shared by every VM, not copied into each", async () => {
    const dataDir = await tempDataDir("agentvm-init-code-");
    const [first, second] = await Promise.all([testVm(dataDir, { name: "init-code-a" }), testVm(dataDir, { name: "init-code-b" })]);
    const mounts = await Promise.all(
      [first, second].map(async (vm) => {
        const { stdout } = await vm.exec("/bin/sh", ["-c", "grep ' /run/agentvm ' /proc/self/mountinfo; touch /run/agentvm/main.js /run/agentvm/new 2>&1; true"]);
        return stdout;
      }),
    );
    for (const seen of mounts) {
      const line = seen.split("\n").find((each) => each.split(" ")[4] === "/run/agentvm");
      assert.ok(line, `init's code is a mount of its own:\n${seen}`);
      assert.match(line, / ro[ ,]/, "mounted read-only");
      assert.match(seen, /Read-only file system/);
      assert.ok(!seen.includes(REPO), "no repository path in it");
    }
    // The same file system (device numbers, field 3) in both VMs.
    const device = (seen: string) => seen.split("\n").find((each) => each.split(" ")[4] === "/run/agentvm")?.split(" ")[2];
    assert.equal(device(mounts[0]!), device(mounts[1]!));
  });

  it("no host path (data directory, VM directory, repository) in mountinfo, cmdline or environ of any process in the VM", async () => {
    const dataDir = await tempDataDir("agentvm-visible-");
    const vm = await testVm(dataDir, { name: "visible" });
    const pid = (await vm.spawn("/bin/sleep", ["30"])).pid;
    try {
      const seen = await vm.exec("/bin/sh", [
        "-c",
        "cat /proc/self/mountinfo; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; tr '\\0' '\\n' < $p/environ; done 2>/dev/null",
      ]);
      assert.ok(seen.stdout.includes(" / / "), "mountinfo was read");
      for (const hostPath of [dataDir, vm.root, REPO, IMAGES, "/run/agentvm/stage"]) {
        assert.ok(!seen.stdout.includes(hostPath), `${hostPath} is visible in the VM:\n${seen.stdout.split("\n").filter((line) => line.includes(hostPath)).join("\n")}`);
      }
      const masked = await vm.exec("/bin/sh", ["-c", "for f in /proc/keys /proc/timer_list /proc/kallsyms; do [ -e $f ] && head -c 64 $f 2>/dev/null | wc -c; done; ls /proc/irq 2>/dev/null | wc -l"]);
      assert.ok(masked.stdout.trim().split("\n").every((count) => count.trim() === "0"), `masked /proc entries gave: ${masked.stdout}`);
    } finally {
      await vm.killProcess(pid, "SIGKILL").catch(() => {});
    }
  });
});
