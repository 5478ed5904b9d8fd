#!/usr/bin/env node
// `cdk synth` / `cdk deploy` entry point; cdk-nag AwsSolutions runs at synth
// and stops it on any finding not acknowledged next to its resource.
import { App } from 'aws-cdk-lib';
import { defineApp } from '../lib/app';

defineApp(new App(), { nag: true });
