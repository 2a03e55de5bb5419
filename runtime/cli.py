def main(argv=None):
    print("phi3v-edge")
