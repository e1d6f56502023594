/**
 * The pool of VM disks made ahead of time (src/sandbox/disk-pool.ts): a new VM
 * gets one and the pool is refilled, whatever a killed server left in it is
 * removed before anything is taken, and a pooled disk is the same disk as one
 * made on the spot — size and inode caps, mount flags, its VM's own id.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readdir, stat, statfs, writeFile } from "node:fs/promises";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { agentOS, setup } from "agentvm";
import { createClient } from "agentvm/client";
import { IMAGE, makeImage, mountImage } from "../src/sandbox/disk-image.ts";
import { DiskPool, diskPoolSize, POOL_DIR } from "../src/sandbox/disk-pool.ts";
import { isMountPoint } from "../src/sandbox/staging.ts";
import { tempDataDir, testVm } from "./helpers.ts";

const asRoot = process.getuid?.() === 0;
const SMALL = { diskBytes: 32 * 1024 * 1024, diskInodes: 2048 };

/** The pool's entries on disk, by kind. */
async function entries(dataDir: string): Promise<string[]> {
  return (await readdir(join(dataDir, POOL_DIR)).catch(() => [] as string[])).sort();
}

/** Mount options of the mount at `point` (per-mount and filesystem ones), from the server's mountinfo. */
function mountOptions(point: string): string[] {
  const line = readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((entry) => entry.split(" ")[4] === point);
  assert.ok(line, `${point} is mounted`);
  const [mine, fs] = line.split(" - ");
  return [...mine!.split(" ")[5]!.split(","), ...fs!.split(" ")[2]!.split(",")].sort();
}

describe("AGENTVM_DISK_POOL", () => {
  it("is a count from 0 to 64; anything else is refused with INVALID_ARGUMENT", () => {
    assert.equal(diskPoolSize(undefined), 8);
    assert.equal(diskPoolSize("0"), 0);
    assert.equal(diskPoolSize("12"), 12);
    for (const bad of ["-1", "1.5", "many", "65"]) assert.throws(() => diskPoolSize(bad), (error: { code?: string }) => error.code === "INVALID_ARGUMENT", bad);
  });

  it("0 turns the pool off", async () => {
    assert.equal(DiskPool.open(await tempDataDir(), 0), undefined);
  });
});

describe("disks made ahead of time", { skip: !asRoot && "VM disks are images only for a server running as root" }, () => {
  it("a new VM takes a pooled disk (its image moves into the VM directory) and the pool is refilled", async () => {
    const dataDir = await tempDataDir();
    const pool = DiskPool.open(dataDir, 2)!;
    try {
      // The first VM of a configuration makes its own disk and tells the pool what to make.
      await testVm(dataDir, { name: "first", limits: SMALL });
      await pool.settled();
      const key = `${SMALL.diskBytes}/${SMALL.diskInodes}`;
      assert.deepEqual(pool.ready(), { [key]: 2 });
      const ready = await entries(dataDir);
      assert.equal(ready.length, 2);
      assert.ok(ready.every((name) => name.startsWith("ready-")), ready.join());
      const pooledImages = await Promise.all(ready.map(async (name) => (await stat(join(dataDir, POOL_DIR, name, IMAGE))).ino));

      const vm = await testVm(dataDir, { name: "second", limits: SMALL });
      const image = (await stat(join(dataDir, "vms", "second", IMAGE))).ino;
      assert.ok(pooledImages.includes(image), "the VM's image is one the pool made");
      assert.equal((await vm.usage()).disk.capped, true);
      await vm.writeFile("/home/agentos/hello.txt", "from a pooled disk");
      assert.equal(new TextDecoder().decode(await vm.readFile("/home/agentos/hello.txt")), "from a pooled disk");

      await pool.settled();
      assert.deepEqual(pool.ready(), { [key]: 2 }, "refilled");
      const after = await entries(dataDir);
      assert.equal(after.length, 2);
      assert.equal(after.filter((name) => ready.includes(name)).length, 1, "one entry was taken, one made");
    } finally {
      await pool.close();
    }
    assert.deepEqual(await entries(dataDir), [], "a closed pool leaves nothing behind");
  });

  it("a VM from the pool has the caps, mount flags and ownership of one made on the spot", async () => {
    const dataDir = await tempDataDir();
    const pool = DiskPool.open(dataDir, 1)!;
    try {
      const made = await testVm(dataDir, { name: "made", limits: SMALL });
      await pool.settled();
      const pooled = await testVm(dataDir, { name: "pooled", limits: SMALL });
      assert.deepEqual(pool.ready(), { [`${SMALL.diskBytes}/${SMALL.diskInodes}`]: 0 }, "the second VM took the pooled disk");

      const [a, b] = await Promise.all([statfs(made.root), statfs(pooled.root)]);
      assert.equal(b.blocks * b.bsize, a.blocks * a.bsize);
      assert.ok(b.blocks * b.bsize <= SMALL.diskBytes && b.blocks * b.bsize > SMALL.diskBytes / 2, `size ${b.blocks * b.bsize}`);
      assert.equal(b.files, a.files);
      assert.ok(b.files >= SMALL.diskInodes && b.files < 4096, `inodes ${b.files}`);
      assert.deepEqual(mountOptions(pooled.root), mountOptions(made.root));
      assert.ok(mountOptions(pooled.root).includes("nosuid") && mountOptions(pooled.root).includes("nodev"));
      assert.deepEqual((await readdir(pooled.root)).sort(), (await readdir(made.root)).sort());
      assert.ok(!(await readdir(pooled.root)).includes("lost+found"));

      // The pooled disk belongs to its VM's own id, as a disk made for it would.
      const owner = (await stat(pooled.root)).uid;
      assert.notEqual(owner, 0);
      assert.notEqual(owner, (await stat(made.root)).uid);
      assert.equal((await stat(pooled.root)).mode & 0o777, 0o700);
      assert.equal((await stat(join(pooled.root, "home/agentos"))).uid, owner);
      assert.equal((await stat(join(dataDir, "vms", "pooled"))).mode & 0o777, 0o700);
      const guest = await pooled.exec("/bin/sh", ["-c", "touch /home/agentos/mine; head -c 40000000 /dev/zero > /tmp/fill; echo rc=$?"]);
      assert.equal((await stat(join(pooled.root, "home/agentos/mine"))).uid, owner);
      assert.match(guest.stderr, /No space left on device/);
      assert.match(guest.stdout, /rc=1/);
    } finally {
      await pool.close();
    }
  });

  it("what a killed server left in the pool (half-made entries, mounts) is removed before anything is taken", async () => {
    const dataDir = await tempDataDir();
    const dir = join(dataDir, POOL_DIR);
    // Killed after mounting, before the rename that marks an entry whole.
    const mounted = join(dir, "making-0123456789abcdef");
    await mkdir(join(mounted, "root"), { recursive: true });
    await makeImage(join(mounted, IMAGE), { bytes: SMALL.diskBytes, inodes: SMALL.diskInodes });
    await mountImage(join(mounted, IMAGE), join(mounted, "root"));
    assert.equal(await isMountPoint(join(mounted, "root")), true);
    // Killed inside mkfs.
    await mkdir(join(dir, "making-fedcba9876543210"), { recursive: true });
    await writeFile(join(dir, "making-fedcba9876543210", `${IMAGE}.partial`), "");
    // Whole, but from a server that is gone.
    await mkdir(join(dir, "ready-00112233445566778"), { recursive: true });

    const pool = DiskPool.open(dataDir, 1)!;
    try {
      // The first VM cannot take any of them: it makes its own disk.
      const vm = await testVm(dataDir, { name: "after-crash", limits: SMALL });
      assert.equal((await vm.usage()).disk.capped, true);
      await pool.settled();
      assert.equal(await isMountPoint(join(mounted, "root")), false, "the half-made entry's disk was unmounted");
      const left = await entries(dataDir);
      assert.equal(left.length, 1, left.join());
      assert.match(left[0]!, /^ready-/);
      assert.ok(!["making-0123456789abcdef", "making-fedcba9876543210", "ready-00112233445566778"].includes(left[0]!));
    } finally {
      await pool.close();
    }
  });

  it("a server opens the pool of its data directory and removes it when it closes", async () => {
    const dataDir = await tempDataDir();
    const registry = setup({ use: { vm: agentOS({ limits: SMALL }) } });
    const server = await registry.start({ port: 0, dataDir, handleSignals: false });
    try {
      const client = createClient<typeof registry>(server.url);
      await client.vm.getOrCreate("one").writeFile("/home/agentos/a.txt", "a");
      // The pool fills in the background: wait for an entry, bounded.
      const deadline = Date.now() + 30_000;
      while (!(await entries(dataDir)).some((name) => name.startsWith("ready-")) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
      assert.ok((await entries(dataDir)).some((name) => name.startsWith("ready-")), "the server made disks ahead of time");
      await client.vm.getOrCreate("two").writeFile("/home/agentos/b.txt", "b");
      assert.equal((await stat(join(dataDir, "vms", "two", "root", "home/agentos/b.txt"))).size, 1);
    } finally {
      await server.close();
    }
    assert.deepEqual(await entries(dataDir), []);
    const mounts = readFileSync("/proc/self/mountinfo", "utf8").split("\n").filter((line) => line.split(" ")[4]?.startsWith(`${dataDir}/`));
    assert.deepEqual(mounts, [], "no disk of the pool or of a VM stays mounted");
  });

  it("a VM directory that already holds files never gets a pooled disk", async () => {
    const dataDir = await tempDataDir();
    const pool = DiskPool.open(dataDir, 1)!;
    try {
      await testVm(dataDir, { name: "first", limits: SMALL });
      await pool.settled();
      const root = join(dataDir, "vms", "legacy", "root");
      await mkdir(join(root, "home/agentos"), { recursive: true });
      await writeFile(join(root, "home/agentos/old.txt"), "kept");
      const vm = await testVm(dataDir, { name: "legacy", limits: SMALL });
      assert.equal(new TextDecoder().decode(await vm.readFile("/home/agentos/old.txt")), "kept");
      assert.equal(pool.ready()[`${SMALL.diskBytes}/${SMALL.diskInodes}`], 1, "the pooled disk is still there");
    } finally {
      await pool.close();
    }
  });
});
