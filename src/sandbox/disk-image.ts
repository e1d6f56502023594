/**
 * Making and mounting one VM disk image (vm-disk.ts): the steps every capped
 * VM disk goes through, whether it is made on the request path or ahead of
 * time by the pool (disk-pool.ts), so both give the same filesystem with the
 * same mount flags.
 */
import { execFile } from "node:child_process";
import { rename, truncate, writeFile } from "node:fs/promises";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The image's name in a VM directory. */
export const IMAGE = "disk.ext4";
const MOUNT_OPTIONS = "loop,nosuid,nodev,noatime";
/** ext4 options: discard gives freed blocks back to the sparse image; noinit_itable skips zeroing inode tables the sparse file already reads as zeros. */
const FS_OPTIONS = "discard,noinit_itable";

export interface DiskLimits {
  bytes: number;
  inodes: number;
}

/** A sparse ext4 image of `limits.bytes` with `limits.inodes` inodes, written as `<image>.partial` and renamed into place when whole. */
export async function makeImage(image: string, limits: DiskLimits): Promise<void> {
  const partial = `${image}.partial`;
  await writeFile(partial, "");
  await truncate(partial, limits.bytes);
  // -m 0: no blocks kept for root, so the server's own writes meet the same cap. ext4 needs
  // at least a block per inode; the kernel rounds the count up to whole block groups.
  const inodes = Math.min(limits.inodes, Math.floor(limits.bytes / 4096));
  await run("mkfs.ext4", ["-q", "-F", "-m", "0", "-N", String(inodes), "-E", `lazy_itable_init=1,lazy_journal_init=1,nodiscard`, partial], {
    timeout: 60_000,
    env: { PATH: "/usr/sbin:/sbin:/usr/bin:/bin" },
  });
  await rename(partial, image);
}

/** Loop-mounts a VM's image at `root` as its disk: nosuid and nodev, whatever a guest writes there. */
export async function mountImage(image: string, root: string): Promise<void> {
  await run("mount", ["-t", "ext4", "-o", `${MOUNT_OPTIONS},${FS_OPTIONS}`, image, root], { timeout: 30_000 });
}

/** Detaches a mount lazily: a file the server still has open does not block it. */
export async function unmount(root: string): Promise<void> {
  await run("umount", ["-l", root], { timeout: 30_000 });
}
