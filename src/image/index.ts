export { ensureImage, imageId, LAYOUT_VERSION, MANIFEST, type EnsureImageOptions, type VmImage } from "./image.ts";
export { imageCacheDir } from "./cache.ts";
export type { ImageLayer } from "./layers.ts";
export { common, parseSoftware, pi, SOFTWARE_NAMES, type SoftwareDescriptor, type SoftwareEntry, type SoftwareName } from "./software.ts";
