// Builds the package: the API's .proto from the repository (proto/api.proto, never committed
// here), TypeScript types generated from it (src/generated), then dist/ (tsc). Run by
// `npm install` (the `prepare` script) and `npm pack`.
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, "..", "..", "proto", "api.proto");
const proto = join(here, "proto", "api.proto");
if (existsSync(source)) {
  mkdirSync(dirname(proto), { recursive: true });
  copyFileSync(source, proto);
} else if (!existsSync(proto)) {
  throw new Error(`no API definition: neither ${source} (a checkout) nor ${proto} (a package)`);
}
const bin = (name) => join(here, "node_modules", ".bin", name);
const generated = join(here, "src", "generated");
rmSync(generated, { recursive: true, force: true });
execFileSync(
  bin("proto-loader-gen-types"),
  [
    "--keepCase",
    "--longs=Number",
    "--enums=String",
    "--defaults",
    "--oneofs",
    "--grpcLib=@grpc/grpc-js",
    `--outDir=${generated}`,
    proto,
  ],
  { stdio: "inherit" },
);
execFileSync(bin("tsc"), ["-p", here], { stdio: "inherit" });
