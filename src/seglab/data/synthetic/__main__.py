from seglab.data.synthetic.generate import main

main()
