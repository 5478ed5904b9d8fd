import * as fs from 'fs';
import * as path from 'path';
import { repoRoot } from '../lib/settings';
import { buildApp, Built } from './helpers';

let built: Built;
let images: Record<string, { source: { directory: string; dockerFile: string; dockerBuildTarget: string; platform: string } }>;
beforeAll(() => {
  built = buildApp();
  built.app.synth();
  const manifest = JSON.parse(fs.readFileSync(path.join(built.outdir, 'Ratepool.assets.json'), 'utf8'));
  images = manifest.dockerImages;
});
afterAll(() => built.cleanup());

const dockerfile = () => fs.readFileSync(path.join(repoRoot(), 'infra/Dockerfile'), 'utf8');

function listFiles(dir: string, prefix = ''): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const rel = prefix + e.name;
    return e.isDirectory() ? listFiles(path.join(dir, e.name), rel + '/') : [rel];
  });
}

test('the worker image is infra/Dockerfile, stage runtime, for linux/arm64, built from the repository root', () => {
  const all = Object.values(images);
  expect(all).toHaveLength(1);
  expect(all[0].source).toEqual(
    expect.objectContaining({ dockerFile: 'infra/Dockerfile', dockerBuildTarget: 'runtime', platform: 'linux/arm64' }),
  );
});

test('the build context holds only what cargo needs (root .dockerignore)', () => {
  const [image] = Object.values(images);
  const files = listFiles(path.join(built.outdir, image.source.directory));
  const outside = files.filter((f) => !/^(Cargo\.toml|Cargo\.lock|build\.rs|\.dockerignore|infra\/Dockerfile|src\/.+)$/.test(f));
  expect(outside).toEqual([]);
  expect(files).toEqual(expect.arrayContaining(['Cargo.toml', 'Cargo.lock', 'infra/Dockerfile']));
  expect(files.some((f) => f.startsWith('src/'))).toBe(true);
});

test('Dockerfile: locked release build of both binaries, a lambda-bundle stage with bootstrap, a non-root runtime running `ratepool worker`', () => {
  const d = dockerfile();
  const stages = [...d.matchAll(/^FROM\s+(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)$/gm)].map((m) => m[2]);
  expect(stages).toEqual(['builder', 'lambda-bundle', 'runtime']);
  expect(d).toMatch(/^ARG RUST_IMAGE=rust:1-bookworm$/m);
  expect(d).toMatch(/cargo build --release --locked --target "\$triple" --bin ratepool --bin ratepool-lambda/);
  expect(d).toMatch(/^FROM scratch AS lambda-bundle\nCOPY --from=builder \/out\/ratepool-lambda \/bootstrap$/m);
  // The runtime is the last stage, so a plain `docker build` makes the worker image.
  const runtime = d.slice(d.indexOf('AS runtime'));
  expect(runtime).toMatch(/^USER 65532:65532$/m);
  expect(runtime).toMatch(/^ENTRYPOINT \["\/usr\/local\/bin\/ratepool", "worker"\]$/m);
  expect(runtime).not.toMatch(/^RUN /m);
});
