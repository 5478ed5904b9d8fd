// Type checking is `tsc --noEmit` (scripts/check.sh). With isolatedModules in
// tsconfig.json ts-jest only strips types, which keeps a run to seconds.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', {}],
  },
};
