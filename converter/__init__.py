"""Converter: Keras → TFLite float32 and int8, accuracy gate through the device runtime, bundles."""
