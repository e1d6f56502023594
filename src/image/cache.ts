/**
 * The per-machine cache of built images and software layers. A cache entry is
 * a directory that appears in one `rename` once complete, so a reader never
 * sees half an entry. A lock file per entry (created with O_EXCL, holding the
 * builder's pid) makes a second process wait for the first instead of building
 * twice; a lock whose pid is dead is stale and taken over. Temp directories
 * carry their builder's pid, so leftovers of dead builds are removed.
 */
import { randomBytes } from "node:crypto";
import { chmod, lstat, mkdir, open, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileSystemFailure } from "./failure.ts";

export function imageCacheDir(): string {
  if (process.env.AGENTVM_IMAGE_DIR) return process.env.AGENTVM_IMAGE_DIR;
  if (process.env.XDG_CACHE_HOME) return join(process.env.XDG_CACHE_HOME, "agentvm", "images");
  return join(homedir(), ".cache", "agentvm", "images");
}

export async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

function alive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Takes `<dir>.lock`; waits while a live process holds it. Returns the release function. */
async function lock(dir: string): Promise<() => Promise<void>> {
  const path = `${dir}.lock`;
  for (;;) {
    try {
      const handle = await open(path, "wx");
      await handle.writeFile(String(process.pid));
      await handle.close();
      return () => rm(path, { force: true });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    }
    const holder = Number(await readFile(path, "utf8").catch(() => ""));
    // An empty file is a lock being written this instant; only a dead pid is stale.
    if (holder && !alive(holder)) await rm(path, { force: true });
    else await sleep(200);
  }
}

/** Removes temp directories left by builders that died (their pid is in the name). */
async function sweep(parent: string): Promise<void> {
  for (const name of await readdir(parent).catch(() => [] as string[])) {
    const pid = /^\.tmp-(\d+)-/.exec(name)?.[1];
    if (pid && !alive(Number(pid))) await rm(join(parent, name), { recursive: true, force: true });
  }
}

/**
 * Returns `dir`, building it with `build(tmp)` first unless it exists. The
 * build fills a fresh temp directory beside dir; a failed build leaves nothing.
 */
export async function buildOnce(dir: string, build: (tmp: string) => Promise<void>): Promise<string> {
  if (await exists(dir)) return dir;
  const parent = join(dir, "..");
  try {
    await mkdir(parent, { recursive: true });
  } catch (error) {
    throw fileSystemFailure(`creating the image cache ${parent}`, error);
  }
  let release: () => Promise<void>;
  try {
    release = await lock(dir);
  } catch (error) {
    throw fileSystemFailure(`locking ${dir}`, error);
  }
  try {
    if (await exists(dir)) return dir; // another process built it while we waited
    await sweep(parent);
    const tmp = join(parent, `.tmp-${process.pid}-${randomBytes(6).toString("hex")}`);
    try {
      await mkdir(tmp);
      await build(tmp);
      await makeReadOnly(tmp);
      await rename(tmp, dir);
    } catch (error) {
      await rm(tmp, { recursive: true, force: true }).catch(() => {});
      throw fileSystemFailure(`building ${dir}`, error);
    }
    return dir;
  } finally {
    await release();
  }
}

/**
 * Files lose every write bit; directories keep the owner's, so the owner can
 * still delete an entry with `rm -rf` (a VM sees it read-only through its mount).
 * Setuid and setgid bits go too: nothing in a VM should gain privileges by exec.
 * The guest node is left alone when hard-linked: its inode is the host's copy.
 */
async function makeReadOnly(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    const path = join(dir, name);
    const info = await lstat(path);
    if (info.isSymbolicLink()) continue;
    if (info.isDirectory()) {
      await makeReadOnly(path);
      await chmod(path, info.mode & 0o1755);
    } else if (info.nlink === 1 || !path.endsWith("/opt/node/bin/node")) {
      await chmod(path, info.mode & 0o555);
    }
  }
  const self = await lstat(dir);
  await chmod(dir, self.mode & 0o1755);
}
