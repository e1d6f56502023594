/**
 * init's code as every VM's sandbox mounts it: one read-only directory bound
 * at INIT_DIR, instead of a copy of each file into each sandbox's /run.
 *
 * The built code (dist/init) changes with every build and lives in the
 * repository, whose path no VM may see. So it is copied once, by content,
 * into `init/<hash>` beside the image cache (read-only modes, written
 * atomically: other servers may be copying it too), and that copy is what is
 * mounted. A root server stages it like the image (staging.ts): a read-only
 * ext4 copy, loop-mounted, so the VM's mountinfo shows a loop device, not a
 * host path. A server running as another user binds the copy itself, as it
 * binds the image (its path shows, as the image's does; see security.md).
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, cp, mkdir, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { AgentVmError } from "../errors.ts";
import { stage } from "./staging.ts";

const copies = new Map<string, Promise<string>>();

/**
 * The directory to bind at INIT_DIR for init's code in `initDir`, copied beside `imageRoot`
 * (the image cache) once per content; staged for bubblewrap when the server runs VMs as
 * unprivileged ids (`staged`).
 */
export async function initCode(initDir: string, imageRoot: string, staged: boolean): Promise<string> {
  if (!existsSync(`${initDir}/main.js`)) throw new AgentVmError("SANDBOX_UNAVAILABLE", `init's built code is missing at ${initDir}; run \`npm run build\``);
  const key = `${initDir}\0${imageRoot}`;
  let copy = copies.get(key);
  if (!copy) {
    copy = copyByContent(initDir, join(dirname(imageRoot), "init"));
    copy.catch(() => copies.delete(key));
    copies.set(key, copy);
  }
  const dir = await copy;
  return staged ? stage(dir, true) : dir;
}

async function copyByContent(initDir: string, cache: string): Promise<string> {
  const files = await initFiles(initDir);
  const hash = createHash("sha256");
  for (const file of files) hash.update(`${file}\0`).update(await readFile(join(initDir, file))).update("\0");
  const dir = join(cache, hash.digest("hex").slice(0, 24));
  if (await stat(dir).catch(() => undefined)) return dir;
  const partial = `${dir}.${process.pid}.partial`;
  await rm(partial, { recursive: true, force: true });
  try {
    for (const file of files) {
      await mkdir(dirname(join(partial, file)), { recursive: true });
      await cp(join(initDir, file), join(partial, file));
      await chmod(join(partial, file), 0o444);
    }
    // Directories last: readable and walkable by the VM's id, writable by nobody.
    for (const parent of [...new Set(files.flatMap((file) => ancestors(file)))].sort().reverse()) await chmod(join(partial, parent), 0o555);
    await chmod(partial, 0o555);
    await rename(partial, dir).catch(async (error: NodeJS.ErrnoException) => {
      // Another server put the same content there first.
      if (error.code !== "ENOTEMPTY" && error.code !== "EEXIST") throw error;
    });
  } finally {
    await chmodTree(partial).catch(() => {});
    await rm(partial, { recursive: true, force: true });
  }
  return dir;
}

/** init's files (relative paths), type declarations and source maps left out. */
async function initFiles(initDir: string): Promise<string[]> {
  const entries = await readdir(initDir, { recursive: true, withFileTypes: true });
  return entries
    .filter((entry) => entry.isFile() && !entry.name.endsWith(".d.ts") && !entry.name.endsWith(".d.cts") && !entry.name.endsWith(".map"))
    .map((entry) => `${entry.parentPath}/${entry.name}`.slice(initDir.replace(/\/$/, "").length + 1))
    .sort();
}

function ancestors(file: string): string[] {
  const parts = file.split("/").slice(0, -1);
  return parts.map((_, i) => parts.slice(0, i + 1).join("/"));
}

/** A partial copy left read-only is made writable again so it can be removed (as root it can be anyway). */
async function chmodTree(dir: string): Promise<void> {
  await chmod(dir, 0o755);
  for (const entry of await readdir(dir, { withFileTypes: true })) if (entry.isDirectory()) await chmodTree(join(dir, entry.name));
}
