/**
 * Where browsers reach previews, which is what `preview.url` says. By default
 * the preview listener's own address (http://localhost:6421). Behind a proxy or
 * a load balancer that address is not what browsers see: `preview.publicUrl`
 * (or AGENTVM_PREVIEW_PUBLIC_URL), e.g. "https://previews.example.com", is
 * used instead. In subdomain mode (`preview.mode: "subdomain"`) each URL is
 * `<scheme>://<token>.<preview host>[:port]/`, the preview host being
 * `preview.host`, else the public URL's host name, else "preview.localhost".
 */
import { invalidArgument } from "../errors.ts";
import { describe } from "../validate.ts";

export type PreviewUrlMode = "path" | "subdomain";

export interface PreviewPublicConfig {
  /** Origin browsers use for previews (scheme, host, port), or undefined for the listener's. */
  publicUrl: URL | undefined;
  mode: PreviewUrlMode;
}

export function parsePreviewPublicConfig(publicUrl: unknown, mode: unknown, env: string | undefined = process.env.AGENTVM_PREVIEW_PUBLIC_URL): PreviewPublicConfig {
  if (mode !== undefined && mode !== "path" && mode !== "subdomain") throw invalidArgument(`start options.preview.mode must be "path" or "subdomain", got ${describe(mode)}`);
  const raw = publicUrl ?? (env === "" ? undefined : env);
  const where = publicUrl !== undefined ? "start options.preview.publicUrl" : "AGENTVM_PREVIEW_PUBLIC_URL";
  let url: URL | undefined;
  if (raw !== undefined) {
    if (typeof raw !== "string") throw invalidArgument(`${where} must be a URL string like "https://previews.example.com", got ${describe(raw)}`);
    try {
      url = new URL(raw);
    } catch {
      throw invalidArgument(`${where} must be a URL like "https://previews.example.com", got ${JSON.stringify(raw)}`);
    }
    if ((url.protocol !== "http:" && url.protocol !== "https:") || (url.pathname !== "/" && url.pathname !== "") || url.search || url.hash || url.username || url.password) {
      throw invalidArgument(`${where} must be an http(s) origin without path, query or credentials (previews are served at its root), got ${JSON.stringify(raw)}`);
    }
  }
  return { publicUrl: url, mode: mode ?? "path" };
}

/** Builds `preview.url` for a token: on the public origin when there is one, else on the listener's. */
export function previewUrlBuilder(config: PreviewPublicConfig, listenerUrl: string, previewHost: string): (token: string) => string {
  const origin = config.publicUrl ?? new URL(listenerUrl);
  if (config.mode === "path") {
    const base = origin.origin;
    return (token) => `${base}/preview/${token}/`;
  }
  const port = origin.port ? `:${origin.port}` : "";
  return (token) => `${origin.protocol}//${token}.${previewHost}${port}/`;
}
