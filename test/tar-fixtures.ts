/**
 * Tar archives built in memory for tests of tar upload (small: test fixtures).
 */
import * as tar from "tar-stream";

export type Entry = { name: string; type?: "file" | "directory" | "symlink" | "link"; mode?: number; linkname?: string; content?: string };

/** The archive of `entries`, in order; files default to mode 0644. */
export async function archive(entries: Entry[]): Promise<Uint8Array> {
  const pack = tar.pack();
  // Read while adding: an entry's callback waits until its bytes were taken.
  const read = (async () => {
    const chunks: Uint8Array[] = [];
    for await (const chunk of pack as AsyncIterable<Uint8Array>) chunks.push(chunk);
    return Buffer.concat(chunks);
  })();
  for (const entry of entries) {
    const { content, ...header } = entry;
    await new Promise<void>((resolve, reject) => pack.entry({ mode: 0o644, ...header }, content ?? "", (error) => (error ? reject(error) : resolve())));
  }
  pack.finalize();
  return read;
}
