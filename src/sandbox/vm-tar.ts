/**
 * A VM directory as a tar stream, both ways, on the host through the confined
 * filesystem (VmFilesystem).
 *
 * Why on the host with tar-stream, not GNU tar in the VM: running tar in the
 * VM would need a sandbox started for every transfer, its bytes would travel
 * base64 through init's output channel (and reach every event subscriber as
 * process output), and it would count against the VM's process cap. On the
 * host the stream goes straight from the socket to the VM's files with
 * backpressure, and every path goes through the same resolver as writeFile:
 * symlinks are interpreted against the VM's root, never the host's.
 *
 * Extraction is stricter than GNU tar: an entry whose name climbs with `..`,
 * or that resolves through a symlink (one in the archive or one already there)
 * to anywhere outside the target directory, is refused with PATH_OUTSIDE_VM
 * and ends the extraction; entries before it stay. Modes keep their
 * permission bits only (setuid, setgid and sticky are stripped). Hard links,
 * devices and FIFOs are skipped and counted. Directory modes are applied last,
 * so a read-only directory in the archive can still be filled.
 */
import { once } from "node:events";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import * as tar from "tar-stream";
import { AgentVmError } from "../errors.ts";
import { MAX_WRITE_MODE, normaliseGuestPath, type OpenedFile, type VmDirectory, type VmFilesystem } from "./filesystem.ts";

export interface TarExtractResult {
  files: number;
  directories: number;
  symlinks: number;
  /** Entries not extracted: hard links, devices, FIFOs. */
  skipped: number;
}

/**
 * Errors that skip one entry when packing rather than end the archive: it vanished, is a hard
 * link or special file, or changed type while packing (a directory swapped for a symlink or a file).
 */
const SKIPPABLE = new Set(["ENOENT", "EPERM", "EINVAL", "EACCES", "ELOOP", "ENOTDIR"]);

/** Streams `dir` as a tar archive (names relative to it). Fails before streaming when `dir` is not a directory. */
export async function packDirectory(files: VmFilesystem, dir: string): Promise<Readable> {
  const root = normaliseGuestPath("path", dir);
  const st = await files.stat(root);
  if (!st.isDirectory) throw new AgentVmError("ENOTDIR", `readTar ${root}: is not a directory; download a file with openReadStream or GET …/files/`);
  const pack = tar.pack();
  // A reader that goes away destroys the pack; whatever waits on it then stops (and closes its file).
  const closed = new Promise<never>((_, reject) => pack.once("close", () => reject(new Error("the tar stream was closed"))));
  closed.catch(() => {});
  const writer: Packer = { pack, closed };
  void (async () => {
    try {
      // The walk goes relative to open directories: one resolution from the VM's root, for `dir`.
      const top = await files.openDirectory(root);
      try {
        await packTree(top, writer, "");
      } finally {
        await top.close();
      }
      pack.finalize();
    } catch (error) {
      pack.destroy(error as Error);
    }
  })();
  return toNodeReadable(pack);
}

/** tar-stream's (streamx) readable as a Node Readable, with backpressure both ways and destroy passed back. */
function toNodeReadable(pack: tar.Pack): Readable {
  const source = pack as unknown as NodeJS.EventEmitter & { pause(): void; resume(): void; destroy(error?: Error): void };
  const out = new Readable({
    highWaterMark: 256 * 1024,
    read: () => source.resume(),
    destroy(error, callback) {
      source.destroy();
      callback(error);
    },
  });
  source.on("data", (chunk: Uint8Array) => {
    if (!out.push(chunk)) source.pause();
  });
  source.on("end", () => out.push(null));
  source.on("error", (error: Error) => out.destroy(error));
  return out;
}

interface Packer {
  pack: tar.Pack;
  /** Rejects once the pack is closed, so no wait on it outlives it. */
  closed: Promise<never>;
}

async function packTree(dir: VmDirectory, pack: Packer, prefix: string): Promise<void> {
  for (const name of await dir.entries()) {
    const entryName = `${prefix}${name}`;
    try {
      const st = await dir.lstat(name);
      const mode = st.mode & MAX_WRITE_MODE;
      const mtime = new Date(st.mtimeMs);
      if (st.isDirectory) {
        const child = await dir.openDirectory(name);
        try {
          await addEntry(pack, { name: `${entryName}/`, type: "directory", mode, mtime });
          await packTree(child, pack, `${entryName}/`);
        } finally {
          await child.close();
        }
      } else if (st.isSymbolicLink) {
        await addEntry(pack, { name: entryName, type: "symlink", linkname: await dir.readlink(name), mode, mtime });
      } else if (st.isFile) {
        await packFile(await dir.openFile(name), pack, entryName, mtime);
      }
    } catch (error) {
      if (!(error instanceof AgentVmError && SKIPPABLE.has(error.code))) throw error;
    }
  }
}

async function packFile({ handle, size, mode }: OpenedFile, { pack, closed }: Packer, name: string, mtime: Date): Promise<void> {
  try {
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    // Settles after the race below may have moved on (a closed pack rejects every entry).
    promise.catch(() => {});
    const sink = pack.entry({ name, type: "file", size, mode: mode & MAX_WRITE_MODE, mtime }, (error) => (error ? reject(error) : resolve()));
    // The header promised `size` bytes: read exactly that many even if the guest is growing the file.
    if (size > 0) {
      for await (const chunk of handle.createReadStream({ start: 0, end: size - 1, autoClose: false })) {
        if (!sink.write(chunk as Uint8Array)) await Promise.race([once(sink as unknown as NodeJS.EventEmitter, "drain"), closed]);
      }
    }
    (sink as unknown as { end(): void }).end();
    await Promise.race([promise, closed]);
  } finally {
    await handle.close();
  }
}

function addEntry({ pack, closed }: Packer, header: Parameters<tar.Pack["entry"]>[0]): Promise<void> {
  const written = new Promise<void>((resolve, reject) => pack.entry(header, (error) => (error ? reject(error) : resolve())));
  written.catch(() => {});
  return Promise.race([written, closed]);
}

/** Extracts a tar stream into `dir` (created if missing); see the file header for what is refused. */
export async function extractInto(files: VmFilesystem, dir: string, source: AsyncIterable<Uint8Array>): Promise<TarExtractResult> {
  const root = normaliseGuestPath("path", dir);
  await files.mkdir(root, { recursive: true });
  const result: TarExtractResult = { files: 0, directories: 0, symlinks: 0, skipped: 0 };
  const directoryModes: [string, number][] = [];
  const extract = tar.extract();
  const feeding = pipeline(Readable.from(source), extract as unknown as NodeJS.WritableStream);
  feeding.catch(() => {});
  try {
    for await (const entry of extract) {
      const header = entry.header;
      const target = entryPath(root, header.name);
      const mode = header.mode & MAX_WRITE_MODE;
      if (target === undefined) {
        entry.resume();
        continue;
      }
      if (header.type === "directory") {
        await files.mkdirWithin(target, root);
        directoryModes.push([target, mode]);
        result.directories++;
        entry.resume();
      } else if (header.type === "file" || header.type === "contiguous-file") {
        await writeEntry(files, root, target, mode, entry as AsyncIterable<Uint8Array>);
        result.files++;
      } else if (header.type === "symlink") {
        await files.symlink(header.linkname, target, { within: root });
        result.symlinks++;
        entry.resume();
      } else {
        result.skipped++;
        entry.resume();
      }
    }
    await feeding;
  } catch (error) {
    extract.destroy();
    throw malformed(error);
  }
  // Deepest first, so a directory made read-only does not stop its parent's change.
  for (const [path, mode] of directoryModes.reverse()) await files.chmod(path, mode, { within: root });
  return result;
}

async function writeEntry(files: VmFilesystem, root: string, target: string, mode: number, entry: AsyncIterable<Uint8Array>): Promise<void> {
  const writer = await files.openWrite(target, { mode, within: root });
  try {
    for await (const chunk of entry) await writer.write(chunk);
    await writer.commit();
  } catch (error) {
    await writer.abort();
    throw error;
  }
}

/** The guest path of an entry, or undefined for the archive's own root ("./"). Names that climb out are refused. */
function entryPath(root: string, name: string): string | undefined {
  const parts = name.split("/").filter((part) => part !== "" && part !== ".");
  if (parts.includes("..")) {
    throw new AgentVmError("PATH_OUTSIDE_VM", `writeTar ${root}: the archive entry ${JSON.stringify(name)} climbs out of the target directory with ".."; extraction stopped there`);
  }
  if (parts.length === 0) return undefined;
  return root === "/" ? `/${parts.join("/")}` : `${root}/${parts.join("/")}`;
}

function malformed(error: unknown): unknown {
  if (error instanceof AgentVmError) return error;
  const message = (error as Error)?.message ?? String(error);
  if ((error as { code?: string })?.code === "ERR_STREAM_PREMATURE_CLOSE") {
    return new AgentVmError("MALFORMED_REQUEST", `writeTar: the archive ended early (${message}); send the whole tar stream`, { cause: error });
  }
  return new AgentVmError("MALFORMED_REQUEST", `writeTar: the body is not a valid tar stream (${message})`, { cause: error });
}
